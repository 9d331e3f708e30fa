"""The exporter: the loop that drains the bus and delivers to MLflow, or to the spool."""
