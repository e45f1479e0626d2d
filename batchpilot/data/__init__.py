"""Data: text sources (corpus), tokenizer, prepare (text -> token shards), packing (shards -> batches)."""
