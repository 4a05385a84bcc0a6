"""Media repository: uploads, downloads, thumbnails, remote media, encryption at rest.

Spec: client-server-api "Content repository"; server-server-api "Content
Repository".
"""
