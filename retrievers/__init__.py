"""memlayer.retrievers: semantic retrieval over the records: the search plan (`search`), the
FAISS vector index and its mirror of the records, BM25 keyword search, keyword terms for every
script, and reciprocal-rank fusion."""
