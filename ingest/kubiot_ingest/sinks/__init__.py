"""Where committed batches go: PostgreSQL (the record) and optionally InfluxDB."""
