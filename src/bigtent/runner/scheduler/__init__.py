"""The scheduler: step DAG, runnable index, matching, leases and the dispatch loop."""
