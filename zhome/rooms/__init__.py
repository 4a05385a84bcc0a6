"""The room model: room versions, event format, auth rules, redaction, and the services built on them."""
