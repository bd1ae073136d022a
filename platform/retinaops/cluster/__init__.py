"""Where jobs run and write: Ray's Jobs API, the services of the local stack, and storage (local or S3)."""
