"""Prompts, the one way every route starts a generation (start_generation), and fill-in-the-middle prompts."""
