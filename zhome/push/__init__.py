"""Push notifications.

Spec: client-server-api "Push Notifications" (module ``push``): push rules
and their predefined server-default set (``rules``, ``evaluator``,
``cache``), the notification log (``notifications``), and delivery through
HTTP pushers to push gateways (``delivery``; Push Gateway API).
"""
