"""Block manager: the only authority over KV-cache memory (blocks, refcounts, block tables)."""
