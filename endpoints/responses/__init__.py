"""OpenAI Responses and Conversations APIs on the store."""
