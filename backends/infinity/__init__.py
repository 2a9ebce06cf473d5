"""Embeddings and rerank through infinity-emb (sentence-transformers models and cross-encoders, torch)."""
