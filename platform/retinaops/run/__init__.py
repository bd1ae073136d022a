"""Running a job on Ray: the Train worker loop, the driver's trainer, Tune trials and the sweep."""
