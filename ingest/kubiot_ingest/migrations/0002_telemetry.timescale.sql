-- Telemetry, one row per metric of a sample, as a TimescaleDB hypertable with daily chunks,
-- compressed by device and metric. Compression and retention policies are set by the service
-- from its configuration.
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
);
SELECT create_hypertable('{{schema}}.telemetry', 'time',
                         chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE);
ALTER TABLE {{schema}}.telemetry SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device, metric',
    timescaledb.compress_orderby = 'stream, time DESC, seq'
);
