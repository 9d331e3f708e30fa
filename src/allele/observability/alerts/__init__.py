"""Alerts: records, emission, storage format and queries (public facade: ``queries``)."""
