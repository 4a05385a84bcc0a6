"""Push notifications.

Spec: client-server-api "Push Notifications" (module ``push``): push rules,
their predefined server-default set, and (later) pushers and the gateway.
"""
