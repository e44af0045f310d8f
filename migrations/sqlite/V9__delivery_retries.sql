-- A webhook delivery whose triggered detection failed transiently (429, 5xx, no answer) is
-- tried again on its own schedule: attempts so far, and when it is due again (Unix ms; NULL:
-- due now). It stays unprocessed (processed_at NULL) until it ends; `outcome` says what the
-- last attempt met.
ALTER TABLE webhook_deliveries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN retry_at INTEGER;
