"""memlayer.kvretrieval: KV memory inside HF models (cache, attention hook, selectors)."""
