"""The OpenAI-compatible HTTP server: validates, authorizes and hands requests to the engine."""
