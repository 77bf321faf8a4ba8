"""memlayer.integrations: adapters over the public API (LangChain and LangGraph in
`memlayer.integrations.langchain`; the HTTP service is not built yet)."""
