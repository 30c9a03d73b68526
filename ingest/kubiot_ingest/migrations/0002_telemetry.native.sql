-- Telemetry, one row per metric of a sample, partitioned by day with native range
-- partitioning. Daily partitions are created ahead by the service; rows whose time falls
-- outside the maintained window land in the default partition.
CREATE TABLE IF NOT EXISTS {{schema}}.telemetry (
    time   timestamptz      NOT NULL,
    device text             NOT NULL,
    stream text             NOT NULL DEFAULT '',
    seq    bigint           NOT NULL DEFAULT 0,
    metric text             NOT NULL,
    value  double precision,
    text   text,
    -- The idempotency key: a redelivered sample is never stored twice.
    PRIMARY KEY (device, metric, stream, time, seq)
) PARTITION BY RANGE (time);
CREATE TABLE IF NOT EXISTS {{schema}}.telemetry_default
    PARTITION OF {{schema}}.telemetry DEFAULT;
