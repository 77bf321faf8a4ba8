"""memlayer.integrations: LangChain classes and the HTTP service, over the public API."""
