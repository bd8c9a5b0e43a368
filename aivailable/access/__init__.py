"""Who may do what: API keys with roles and limits, the auth middleware, key management."""
