-- Tables every layout shares: messages that could not be stored, and what devices report.
CREATE TABLE IF NOT EXISTS {{schema}}.dead_letter (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at timestamptz NOT NULL,
    topic       text        NOT NULL,
    payload     bytea       NOT NULL,
    reason      text        NOT NULL,
    detail      text        NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS dead_letter_received_at ON {{schema}}.dead_letter (received_at);
CREATE INDEX IF NOT EXISTS dead_letter_reason ON {{schema}}.dead_letter (reason, received_at);

CREATE TABLE IF NOT EXISTS {{schema}}.devices (
    device     text        NOT NULL,
    kind       text        NOT NULL,
    online     boolean,
    last_seen  timestamptz,
    reported   jsonb,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device, kind)
);
