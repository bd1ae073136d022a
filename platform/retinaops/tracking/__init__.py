"""MLflow, the one door to it: runs, params, metrics, artifacts, the journal of undelivered writes, the registry, the served model."""
