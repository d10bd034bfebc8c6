"""A cache shared between machines (fsspec URLs) and the Dask executor that builds through it."""
