-- Pura gateway schema, version 2: the on-chain receipt outbox (gateway.chain.outbox).
-- A row is written, with both signatures, before the answer leaves the gateway; a batcher
-- submits rows to CompletionTracker and records the outcome from the transaction's events.
-- Amounts are settlement-token base units as decimal strings (18-decimal tokens exceed BIGINT).

CREATE TABLE chain_receipts (
    request_id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    task_type TEXT NOT NULL,
    sink TEXT NOT NULL,
    source TEXT NOT NULL,
    task_id TEXT NOT NULL,
    amount TEXT NOT NULL,
    response_hash TEXT NOT NULL,
    nonce BIGINT NOT NULL,
    deadline BIGINT NOT NULL,
    sink_sig TEXT NOT NULL,
    source_sig TEXT NOT NULL,
    status TEXT NOT NULL,          -- queued | sent | confirmed | rejected
    reason INTEGER,                -- CompletionTracker rejection reason, when rejected
    tx_hash TEXT,
    tries INTEGER NOT NULL DEFAULT 0,
    chain_ts BIGINT NOT NULL,      -- the chain's clock (estimated) when the receipt was made
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX chain_receipts_status ON chain_receipts (status, created_ms);
CREATE UNIQUE INDEX chain_receipts_nonce ON chain_receipts (source, nonce);
CREATE INDEX chain_receipts_spend ON chain_receipts (task_type, chain_ts);

-- Nonces are handed out in blocks per source, so replicas sharing a source never collide;
-- a block lost in a crash only leaves a gap (the tracker's nonces are a bitmap, not a counter).
CREATE TABLE chain_nonces (
    source TEXT PRIMARY KEY,
    next_nonce BIGINT NOT NULL
);
