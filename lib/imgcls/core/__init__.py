"""Core: repository paths, the grid-file schema and strategies, names MLflow accepts."""
