"""The conversation store: assistants, threads, messages, runs, responses and conversations, owned by API keys."""
