"""The Identity Service API zhome serves itself (identity-service-api, v2).

``store`` keeps accounts, associations, stored invitations and the lookup
pepper (addresses sealed, found by the blind index); ``service`` is the
protocol (bind, lookup, store-invite, signing); ``servlets`` the HTTP
endpoints under ``/_matrix/identity/v2``; ``http`` the small JSON client
the homeserver and the identity service use to talk to each other over
HTTP (``client``: the homeserver's side of the conversation).
"""
