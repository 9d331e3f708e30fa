"""Transports to MLflow: REST, the client in a worker process or thread."""
