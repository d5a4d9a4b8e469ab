-- Pura gateway schema, version 3: who holds a claimed receipt (gateway.chain.outbox).
-- A batcher stamps the rows it claims (status 'sent') with its process's random id. Replicas
-- share the table on PostgreSQL: once a claim's lease has run out (updated_ms older than the
-- outbox's reclaim_after_ms) another replica may take the row over, and the first claimer's
-- late requeue must then leave it alone instead of queueing it a third time.

ALTER TABLE chain_receipts ADD COLUMN claimed_by TEXT
