-- Anomalies the ingest found in stored telemetry (docs/ingest.md#anomaly-detection). `time` is
-- the sample's time (for `silent`: when the device was last heard from), `low` and `high` the
-- expected range, `metric` is '' for `silent`. The key makes a second recording of the same
-- finding (another replica, a redelivery) a no-op.
CREATE TABLE IF NOT EXISTS {{schema}}.anomalies (
    device      text             NOT NULL,
    metric      text             NOT NULL DEFAULT '',
    time        timestamptz      NOT NULL,
    rule        text             NOT NULL,
    value       double precision,
    low         double precision,
    high        double precision,
    detected_at timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (device, metric, time, rule)
);
-- The newest anomalies of a tenant, and the retention pass.
CREATE INDEX IF NOT EXISTS anomalies_time ON {{schema}}.anomalies (time);
