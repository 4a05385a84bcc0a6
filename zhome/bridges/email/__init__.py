"""The email bridge: an application service that posts mail into rooms.

Spec: application-service-api (registration, transactions pushed by the
homeserver, ``m.login.application_service`` registration of ghost users,
``?user_id=`` identity assertion) and client-server-api (rooms, profiles,
media upload, ``m.relates_to`` replies). Mail: RFC 5321 (SMTP), RFC 1870
(SIZE), RFC 2033 (LMTP), RFC 5322 and RFC 2045-2049 (messages, MIME),
RFC 3834 (Auto-Submitted).

The bridge never imports the homeserver's internals and never touches its
tables: it has its own SQLite database (``store``) and speaks to the
homeserver only through the AS and Client-Server HTTP APIs (``hsclient``).
Only library-level helpers are shared: the ``Database`` wrapper and the
at-rest ``Sealer`` (with a key ring and key store of the bridge's own).

Modules: ``registration`` (the registration file the homeserver loads),
``store`` (inbound table, room addresses, known events), ``tokens``
(ghost user IDs, signed reply addresses), ``mime`` (mail to event content),
``smtp`` (ESMTP and LMTP listeners), ``appservice`` (the transaction
listener), ``processor`` (posting the inbound table), ``bridge`` (wiring).
"""
