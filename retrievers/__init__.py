"""memlayer.retrievers: semantic selection (vector indexes, BM25 fusion, clustered RAG)."""
