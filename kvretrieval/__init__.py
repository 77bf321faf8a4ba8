"""memlayer.kvretrieval: KV memory inside HF transformers models (cache, attention hook, selectors)."""
