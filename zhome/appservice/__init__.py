"""Application Service API (spec: application-service-api): registrations,
namespaces, the per-service transaction queue, queries and masquerading."""
