"""memlayer.integrations: adapters over the public API (LangChain, the HTTP service); none is
built yet."""
