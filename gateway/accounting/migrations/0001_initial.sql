-- Pura gateway schema, version 1. Portable SQL: runs unchanged on SQLite >= 3.35 and
-- PostgreSQL >= 12. Money columns are integer micro-USD (suffix _micros). Times are integer
-- milliseconds since the Unix epoch (suffix _ms). Booleans are INTEGER 0/1.

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    daily_budget_micros BIGINT NOT NULL,
    rate_limit_per_min INTEGER NOT NULL,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT,
    last_used_ms BIGINT
);

-- Sliding-window rate limit: admitted requests per key and second, pruned past the window.
CREATE TABLE rate_buckets (
    key_id TEXT NOT NULL,
    sec BIGINT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (key_id, sec)
);

-- Daily budget per key and UTC day: spent (settled) and reserved (in flight).
CREATE TABLE budget_days (
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    spent_micros BIGINT NOT NULL DEFAULT 0,
    reserved_micros BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);

-- Open reservations; settle deletes the row (idempotent), the sweeper releases stale ones.
-- The table only holds requests in flight, so the sweeper's scan needs no index.
CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    day TEXT NOT NULL,
    amount_micros BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- One row per answered (or failed) request: the accounting record.
CREATE TABLE usage_records (
    request_id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    finished_ms BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    provider TEXT,
    model TEXT,
    tier TEXT,
    stream INTEGER NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    usage_estimated INTEGER NOT NULL DEFAULT 0,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    billed_micros BIGINT NOT NULL DEFAULT 0,
    premium_cost_micros BIGINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    cascade_depth INTEGER NOT NULL DEFAULT 0,
    confidence_milli INTEGER,
    explored INTEGER NOT NULL DEFAULT 0,
    latency_ms INTEGER NOT NULL DEFAULT 0,
    response_sha256 TEXT
);
CREATE INDEX usage_records_key_time ON usage_records (key_id, created_ms);
CREATE INDEX usage_records_time ON usage_records (created_ms);

-- Every upstream call made for a request (fallbacks and cascade escalations included).
CREATE TABLE usage_attempts (
    request_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    tier TEXT NOT NULL,
    outcome TEXT NOT NULL,
    cost_micros BIGINT NOT NULL DEFAULT 0,
    latency_ms INTEGER NOT NULL DEFAULT 0,
    score_milli INTEGER,
    PRIMARY KEY (request_id, seq)
);
CREATE INDEX usage_attempts_time ON usage_attempts (created_ms);
