"""Twisted web glue: routing, JSON, Matrix errors, auth, rate limits, CORS, metrics."""
