"""Serving: the MLflow pyfunc model (bytes in, class probabilities out) and the predict CLI."""
