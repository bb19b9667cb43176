"""Evaluation: metrics, test-set evaluation of a grid point, comparison of grid points."""
