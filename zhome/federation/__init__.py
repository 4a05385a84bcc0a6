"""The server-server (federation) API.

Spec: server-server-api. Request signing and checking, server discovery,
inbound endpoints, the outbound transaction queue, and the key server and
keyring ("Retrieving server keys").
"""
