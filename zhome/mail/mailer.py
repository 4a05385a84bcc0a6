"""The mails the homeserver and its identity service send, queued in the outbox.

Never logs an address or a token.
"""

from __future__ import annotations

import email
import email.policy
from typing import Optional

from zhome.mail.compose import compose, envelope_address
from zhome.mail.outbox import MailOutbox


def one_line(text: str, limit: int = 200) -> str:
    """``text`` fit for a header or a line of a mail: no control characters, bounded."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(cleaned.split())[:limit]


class Mailer:
    def __init__(self, outbox: MailOutbox, notif_from: str, app_name: str) -> None:
        self.outbox = outbox
        self.notif_from = notif_from
        self.app_name = app_name

    async def send(self, to: str, subject: str, text: str, reply_to: Optional[str] = None) -> int:
        message = compose(self.notif_from, to, one_line(subject), text)
        if reply_to is not None:
            parsed = email.message_from_bytes(message, policy=email.policy.default)
            parsed["Reply-To"] = reply_to
            message = parsed.as_bytes()
        return await self.outbox.enqueue(envelope_address(self.notif_from), to, message)

    async def send_validation(self, to: str, token: str, link: str, purpose: str) -> int:
        what = {"register": "to register an account", "password": "to reset your password",
                "add": "to add this address to your account", "bind": "to link this address to your account"
                }.get(purpose, "to confirm this address")
        text = (f"Someone asked {what} on {self.app_name} with this email address.\n\n"
                f"To confirm, open this link:\n\n{link}\n\n"
                f"or enter this code where you were asked for it:\n\n{token}\n\n"
                "If it was not you, ignore this mail: nothing happens without the confirmation.\n")
        return await self.send(to, f"Confirm your email address for {self.app_name}", text)

    async def send_invitation(self, to: str, inviter: str, room_name: str, link: str,
                              reply_to: Optional[str] = None, register_link: Optional[str] = None,
                              encrypted: bool = False) -> int:
        """The invitation mail: who invited whom to which room, and the ways
        in. ``reply_to`` (the email bridge is on): replying takes part by
        email at once. ``register_link``: a registration page of this server
        bound to the invitation. ``link``: a client, for an existing account."""
        inviter, room_name = one_line(inviter), one_line(room_name)
        parts = [f"{inviter} invited you to {room_name} on {self.app_name}.\n"]
        if reply_to is not None:
            parts.append("To take part by email, just reply to this mail: your reply is posted in the room,"
                         " and the room's messages come to you by mail.\n")
        elif encrypted:
            parts.append("The room is end-to-end encrypted: its messages can only be read with an account"
                         " (they cannot be mailed).\n")
        if register_link is not None:
            parts.append(f"To take part with a Matrix account, create one here (this link is for you only):"
                         f"\n\n{register_link}\n")
        parts.append(f"If you already have an account, sign in with this email address:\n\n{link}\n")
        return await self.send(to, f"{inviter} invited you to {room_name}", "\n".join(parts), reply_to=reply_to)
