"""Writing results: the original's artifacts, the suite's tables, run folders."""
