"""OpenAI Assistants API v2 (beta): assistants, threads, messages, runs and run steps on the store."""
