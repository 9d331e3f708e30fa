"""Destinations beside the run batch: request batching, dead letters, the genome registry."""
