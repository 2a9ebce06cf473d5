"""The one generation pipeline every route uses, and fill-in-the-middle prompts."""
