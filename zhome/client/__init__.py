"""Client-Server API endpoints (spec: client-server-api)."""
