"""zhome: a Matrix homeserver for organisations, on Twisted."""

__version__ = "0.1.0"
