"""The bus, runs, context, names and accounting, and the Observability facade."""
