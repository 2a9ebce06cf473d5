"""Hugging Face downloads: requests, resumable verified transfers, background jobs, the CLI."""
