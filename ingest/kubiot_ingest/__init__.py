"""kubiot ingest: streams MQTT telemetry of one tenant into PostgreSQL/TimescaleDB."""
