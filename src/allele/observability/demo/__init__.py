"""The built-in demo experiment: a genetic algorithm run as a small matrix."""
