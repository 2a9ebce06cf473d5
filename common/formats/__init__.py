"""Prompt and output formats: chat templates, output constraints, tool calls, reasoning, output shapes."""
