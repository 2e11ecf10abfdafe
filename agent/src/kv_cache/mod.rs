//! Paged KV-cache bookkeeping: block pool, prefix-cache hashing, per-request block tables, cache events.
