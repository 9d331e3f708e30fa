"""Built-in event sources: system metrics."""
