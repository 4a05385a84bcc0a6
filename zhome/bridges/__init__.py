"""Bridges that run beside the homeserver and reach it only over HTTP."""
