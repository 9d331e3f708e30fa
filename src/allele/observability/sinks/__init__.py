"""Destinations: how batches reach an MLflow tracking store."""
