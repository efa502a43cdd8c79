"""Model architectures, sources (folders, hub ids, GGUF, aliases) and mixture-of-experts support."""
