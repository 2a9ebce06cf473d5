"""Configuration: the schema (one pydantic model for config.yml, env vars and flags), its loader and CLI."""
