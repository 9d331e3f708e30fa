"""The exporter: the background loop that drains the bus and delivers batches."""
