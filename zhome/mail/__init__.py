"""Outbound mail for the homeserver (and, later, the email bridge).

Spec context: client-server-api "Adding Account Administrative Contact
Information" and identity-service-api "Email associations" and
"Invitation storage" send mail (validation tokens, invitations); the
specification leaves the transport to the server. This package is that
transport: ``compose`` builds RFC 5322 messages, ``smtp`` hands one to a
configured relay (RFC 5321 ESMTP with STARTTLS, RFC 8314 implicit TLS,
RFC 4954 AUTH) with twisted.mail, and ``outbox`` keeps a persistent,
sealed-at-rest queue that retries with backoff and survives restarts.

Everything takes its collaborators as arguments (a ``Database``, a
``Sealer``, a relay), so another component can run it on its own database.
"""
