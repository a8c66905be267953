"""The benchmark: the seed notebook against the DVC pipeline (run it with bench/run.py)."""
