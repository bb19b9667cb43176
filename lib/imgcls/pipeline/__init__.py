"""Pipeline: a strategy's training session, notebook execution, grid points, the runner, Dask."""
