"""Canonical JSON, signing keys, event hashes and signatures (spec: appendices)."""
