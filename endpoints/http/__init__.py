"""The HTTP kit shared by every dialect: auth, limits, streaming, metrics, lifecycle, request context, middleware."""
