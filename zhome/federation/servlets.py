"""Inbound Server-Server API endpoints.

Spec: server-server-api: /send/{txnId} (PDUs and EDUs, idempotent per
origin and txnId), make_join/send_join (v2), make_leave/send_leave (v2),
make_knock/send_knock, invite (v2), backfill, get_missing_events, state,
state_ids, event, event_auth, query/directory, query/profile,
user/devices, user/keys/query, user/keys/claim (server-server-api
"End-to-End Encryption", "Device Management"), publicRooms, hierarchy
("Spaces", zhome/rooms/spaces.py). Every request is authenticated with X-Matrix;
every PDU is checked by the federation handler before it is stored.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from zhome.crypto.event_hashing import hash_and_sign_event, verify_content_hash
from zhome.crypto.signing import sign_json
from zhome.federation.handler import EventRejected, PduRejected, _strip_pdu, parse_pdu
from zhome.federation.request_auth import authenticate_request, reject_json_constant
from zhome.http.errors import MatrixError, bad_json, forbidden, not_found, too_large
from zhome.http.server import JsonResource, query_arg, query_args, query_int
from zhome.rooms.events import Event, StateMap
from zhome.rooms.redaction import prune_event_dict
from zhome.rooms.restricted import AUTHORISED_VIA, JoinNotAuthorised
from zhome.rooms.versions import KNOWN_ROOM_VERSIONS, RoomVersion, get_room_version
from zhome.util.ids import server_of

if TYPE_CHECKING:
    from zhome.server import HomeServer

logger = logging.getLogger(__name__)

FED = r"/_matrix/federation/(?P<ver>v1|v2)"
MAX_TXN_BYTES = 10 * 1024 * 1024
MAX_PDUS = 50
MAX_EDUS = 100
MAX_BACKFILL = 100


class FederationServlets:
    def __init__(self, hs: "HomeServer") -> None:
        self.hs = hs
        self.events = hs.events
        self.handler = hs.federation_handler

    def register_routes(self, r: JsonResource) -> None:
        room = r"(?P<room_id>[^/]+)"
        eid = r"(?P<event_id>[^/]+)"
        r.register("PUT", FED + r"/send/(?P<txn_id>[^/]+)", self.on_send, "fed_send")
        r.register("GET", FED + r"/make_join/" + room + r"/(?P<user_id>[^/]+)", self.on_make_join, "make_join")
        r.register("PUT", FED + r"/send_join/" + room + "/" + eid, self.on_send_join, "send_join")
        r.register("GET", FED + r"/make_leave/" + room + r"/(?P<user_id>[^/]+)", self.on_make_leave, "make_leave")
        r.register("PUT", FED + r"/send_leave/" + room + "/" + eid, self.on_send_leave, "send_leave")
        r.register("GET", FED + r"/make_knock/" + room + r"/(?P<user_id>[^/]+)", self.on_make_knock, "make_knock")
        r.register("PUT", FED + r"/send_knock/" + room + "/" + eid, self.on_send_knock, "send_knock")
        r.register("PUT", FED + r"/invite/" + room + "/" + eid, self.on_invite, "invite")
        r.register("PUT", FED + r"/exchange_third_party_invite/" + room, self.on_exchange_third_party_invite,
                   "exchange_third_party_invite")
        r.register("GET", FED + r"/backfill/" + room, self.on_backfill, "backfill")
        r.register("GET", FED + r"/timestamp_to_event/" + room, self.on_timestamp_to_event, "fed_timestamp_to_event")
        r.register("POST", FED + r"/get_missing_events/" + room, self.on_get_missing_events, "get_missing_events")
        r.register("GET", FED + r"/state/" + room, self.on_state, "state")
        r.register("GET", FED + r"/state_ids/" + room, self.on_state_ids, "state_ids")
        r.register("GET", FED + r"/event/" + eid, self.on_event, "event")
        r.register("GET", FED + r"/event_auth/" + room + "/" + eid, self.on_event_auth, "event_auth")
        r.register("GET", FED + r"/query/directory", self.on_query_directory, "query_directory")
        r.register("GET", FED + r"/query/profile", self.on_query_profile, "query_profile")
        r.register("GET", FED + r"/user/devices/(?P<user_id>[^/]+)", self.on_user_devices, "user_devices")
        r.register("POST", FED + r"/user/keys/query", self.on_user_keys_query, "user_keys_query")
        r.register("POST", FED + r"/user/keys/claim", self.on_user_keys_claim, "user_keys_claim")
        r.register("GET", FED + r"/publicRooms", self.on_public_rooms, "fed_public_rooms")
        r.register("POST", FED + r"/publicRooms", self.on_public_rooms, "fed_public_rooms")
        r.register("GET", FED + r"/hierarchy/" + room, self.on_hierarchy, "fed_hierarchy")

    async def on_hierarchy(self, request: Request, ver: str, room_id: str) -> tuple[int, Any]:
        """Spec: server-server-api "Spaces" (zhome/rooms/spaces.py)."""
        if ver != "v1":
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        origin = await self._auth(request)
        raw = query_arg(request, "suggested_only", "false")
        if raw not in ("true", "false"):
            raise MatrixError(400, "M_INVALID_PARAM", "suggested_only must be 'true' or 'false'")
        return 200, await self.hs.space_hierarchy.federation_hierarchy(origin, room_id, raw == "true")

    async def on_exchange_third_party_invite(self, request: Request, room_id: str,
                                             ver: str = "v1") -> tuple[int, Any]:
        """Spec: server-server-api "Third-party invites" (zhome/rooms/third_party_invites.py)."""
        if ver != "v1":
            raise MatrixError(404, "M_UNRECOGNIZED", "Unrecognized request")
        origin, body = await self._authed_body(request)
        if not isinstance(body, dict):
            raise MatrixError(400, "M_BAD_JSON", "Expected a JSON object")
        await self.hs.third_party_invites.on_exchange(origin, room_id, body)
        return 200, {}

    # -- helpers -----------------------------------------------------------------
    async def _auth(self, request: Request, body: Any = None) -> str:
        origin = await authenticate_request(
            request, body, self.hs.server_name, self._verify_key,
            is_server_allowed=self._server_allowed,
        )
        sender = self.hs.federation_sender
        if sender is not None:
            await sender.on_destination_alive(origin)
        return origin

    def _server_allowed(self, server: str) -> bool:
        # Every request refused by the operator's policy is counted.
        if self.hs.residency_policy.server_allowed(server):
            return True
        self.hs.residency_policy.count_refusal("request")
        return False

    async def _verify_key(self, server: str, key_id: str, at_ts: int) -> Any:
        from zhome.federation.keyring import KeyLookupError

        try:
            return await self.hs.keyring.get_verify_key(server, key_id, at_ts)
        except KeyLookupError:
            return None

    def _body(self, request: Request, max_size: int = MAX_TXN_BYTES) -> Any:
        raw = request.content.read(max_size + 1) if request.content is not None else b""
        if len(raw) > max_size:
            raise too_large("Request too large")
        if not raw:
            return None
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=reject_json_constant)
        except (ValueError, UnicodeDecodeError):
            raise MatrixError(400, "M_NOT_JSON", "Content not JSON")

    async def _authed_body(self, request: Request) -> tuple[str, Any]:
        body = self._body(request)
        origin = await self._auth(request, body)
        return origin, body

    async def _room_version(self, room_id: str) -> str:
        v = await self.hs.rooms.get_room_version(room_id)
        if v is None:
            raise not_found("Unknown room")
        return v

    def _pdu_for(self, origin: str, ev: Event) -> dict[str, Any]:
        """The event as ``origin`` may have it: a user who blocked the
        transfer of their data to that server has their events served in
        the redacted form (what the room's graph and auth rules need; the
        signatures still verify and the receiver, finding the content
        hash does not match, keeps it redacted). Leaves and redactions
        take data back and go in full, as the federation sender sends them."""
        may = self.hs.transfer_store.may_receive
        if may(ev.sender, origin) or ev.type == "m.room.redaction" or ev.membership == "leave":
            return ev.pdu
        return prune_event_dict(ev.room_version, ev.pdu)

    def _pdus_for(self, origin: str, events: Any) -> list[dict[str, Any]]:
        return [self._pdu_for(origin, e) for e in events]

    async def _origin_in_room(self, origin: str, room_id: str) -> None:
        """Only servers with a member in the room may read it."""
        await self._room_version(room_id)
        state = await self.events.get_current_state_ids(room_id)
        ids = [eid for (t, sk), eid in state.items() if t == "m.room.member" and server_of(sk) == origin]
        evs = await self.events.get_events(ids)
        if not any(e.membership in ("join", "invite", "knock", "leave") for e in evs.values()):
            raise forbidden("Your server is not in this room")
        if not await self.handler._room_allows(origin, room_id):
            self.hs.residency_policy.count_refusal("read")
            raise forbidden("Refused by this room's residency policy")

    async def _auth_chain(self, event_ids: list[str], limit: int = 10000) -> list[Event]:
        seen: dict[str, Event] = {}
        todo = list(event_ids)
        for _ in range(limit):
            if not todo:
                break
            batch = await self.events.get_events(todo[:200])
            todo = todo[200:]
            for e in batch.values():
                for a in e.auth_event_ids:
                    if a not in seen:
                        seen[a] = None  # type: ignore[assignment]
                        todo.append(a)
            for k, v in batch.items():
                if k in seen and seen[k] is None:
                    seen[k] = v
        got = await self.events.get_events([k for k, v in seen.items() if v is None])
        for k, v in got.items():
            seen[k] = v
        return [e for e in seen.values() if e is not None]

    # -- /send ------------------------------------------------------------------------
    async def on_send(self, request: Request, ver: str, txn_id: str) -> tuple[int, Any]:
        origin, body = await self._authed_body(request)
        if not isinstance(body, dict):
            raise bad_json("Transaction must be an object")
        if body.get("origin", origin) != origin:
            raise forbidden("Transaction origin does not match the request's signature")
        pdus = body.get("pdus", [])
        edus = body.get("edus", [])
        if not isinstance(pdus, list) or not isinstance(edus, list):
            raise bad_json("pdus and edus must be lists")
        if len(pdus) > MAX_PDUS or len(edus) > MAX_EDUS:
            raise bad_json(f"A transaction holds at most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs")
        rows = await self.hs.db.execute(
            "received_txn", "SELECT response FROM federation_received_txns WHERE origin = ? AND txn_id = ?",
            origin, txn_id)
        if rows:
            return 200, json.loads(rows[0][0])
        results: dict[str, Any] = {}
        for pdu in pdus:
            room_id = pdu.get("room_id") if isinstance(pdu, dict) else None
            known_version = await self.hs.rooms.get_room_version(room_id) if isinstance(room_id, str) else None
            event_id = _event_id_guess(pdu, known_version)
            try:
                event_id = await self.handler.on_receive_pdu(origin, pdu)
                results[event_id] = {}
            except EventRejected:
                # Processed: stored as rejected, which is no error of the
                # transaction (server-server-api "Transactions").
                results[event_id] = {}
            except PduRejected as e:
                results[event_id] = {"error": str(e)[:500]}
            except MatrixError as e:
                results[event_id] = {"error": e.msg[:500]}
            except Exception as e:
                logger.exception("processing PDU %s from %s", event_id, origin)
                results[event_id] = {"error": f"internal error: {type(e).__name__}"}
        for edu in edus:
            try:
                await self._on_edu(origin, edu)
            except Exception:
                logger.exception("processing EDU from %s", origin)
        response = {"pdus": results}

        def store(txn: Any) -> None:
            txn.execute("DELETE FROM federation_received_txns WHERE origin = ? AND txn_id = ?", (origin, txn_id))
            txn.execute(
                "INSERT INTO federation_received_txns (origin, txn_id, response, received_ts) VALUES (?,?,?,?)",
                (origin, txn_id, json.dumps(response), int(time.time() * 1000)))

        await self.hs.db.run_interaction("store_received_txn", store)
        logger.info("transaction %s from %s: %d pdus, %d edus", txn_id, origin, len(pdus), len(edus))
        return 200, response

    async def _on_edu(self, origin: str, edu: Any) -> None:
        if not isinstance(edu, dict):
            return
        etype = edu.get("edu_type")
        content = edu.get("content")
        if not isinstance(content, dict):
            return
        if etype == "m.typing":
            room_id, user_id, typing = content.get("room_id"), content.get("user_id"), content.get("typing")
            if not isinstance(room_id, str) or not isinstance(user_id, str) or server_of(user_id) != origin:
                return
            eid = await self.events.get_current_state_event_id(room_id, "m.room.member", user_id)
            ev = await self.events.get_event(eid) if eid else None
            if ev is None or ev.membership != "join":
                return
            timeout = content.get("timeout", 30000)
            self.hs.typing.set_typing(room_id, user_id, bool(typing), timeout if isinstance(timeout, int) else 30000,
                                      local=False)
        elif etype == "m.presence":
            pushes = content.get("push")
            if isinstance(pushes, list):
                await self.hs.presence.on_remote_presence(origin, pushes)
        elif etype == "m.device_list_update":
            await self.hs.device_lists.on_remote_update(origin, content)
        elif etype == "m.signing_key_update":
            await self.hs.cross_signing.on_remote_update(origin, content)
        elif etype == "m.direct_to_device":
            await self.hs.to_device.on_remote_edu(origin, content)
        elif etype == "m.receipt":
            for room_id, by_type in content.items():
                if not isinstance(by_type, dict):
                    continue
                for rtype, by_user in by_type.items():
                    if rtype != "m.read" or not isinstance(by_user, dict):
                        continue
                    for user_id, data in by_user.items():
                        if server_of(user_id) != origin or not isinstance(data, dict):
                            continue
                        ids = data.get("event_ids")
                        if not isinstance(ids, list) or not ids or not isinstance(ids[0], str):
                            continue
                        ev = await self.events.get_event(ids[0])
                        if ev is None or ev.room_id != room_id:
                            continue
                        raw_data = data.get("data")
                        rdata = raw_data if isinstance(raw_data, dict) else {}
                        raw_thread_id = rdata.get("thread_id")
                        thread_id = raw_thread_id if isinstance(raw_thread_id, str) else ""
                        pos = await self.hs.user_data.set_receipt(
                            room_id, "m.read", user_id, ids[0], {k: v for k, v in rdata.items() if k == "ts"},
                            thread_id)
                        self.hs.notifier.on_receipt(pos, room_id)

    # -- joining ---------------------------------------------------------------------------
    async def _make_membership(self, request: Request, room_id: str, user_id: str, membership: str,
                               versions_checked: bool) -> tuple[int, Any]:
        origin = await self._auth(request)
        if server_of(user_id) != origin:
            raise forbidden("The user is not on the requesting server")
        version = await self._room_version(room_id)
        if not any(server_of(u) == self.hs.server_name for u in await self.events.get_joined_users(room_id)):
            # Every local user left: this server cannot vouch for the room.
            raise not_found("This server is no longer in the room")
        if versions_checked:
            supported = query_args(request, "ver") or ["1"]
            if version not in supported:
                raise MatrixError(400, "M_INCOMPATIBLE_ROOM_VERSION",
                                  f"Your server does not support room version {version}", room_version=version)
        if not await self.handler._room_allows(origin, room_id):
            self.hs.residency_policy.count_refusal("join")
            raise forbidden("This server's residency policy does not allow your server in this room")
        creator = self.hs.event_creator
        rv = get_room_version(version)
        prevs, group, state, depth = await creator.state_before_new_event(room_id)
        content: dict[str, Any] = {"membership": membership}
        if membership == "join":
            try:
                via = await self.hs.membership.restricted.authoriser_for(rv, state, user_id)
            except JoinNotAuthorised as e:
                raise _not_authorised(e)
            if via is not None:
                content[AUTHORISED_VIA] = via
        from zhome.rooms import auth

        keys = auth.auth_types_for_event(rv, "m.room.member", user_id, user_id, content)
        auth_ids = [state[k] for k in keys if k in state]
        pdu = creator.build_pdu(rv, room_id, "m.room.member", user_id, content, user_id, prevs, auth_ids, depth)
        if "origin" in pdu:
            pdu["origin"] = origin
        # Check now, so a refused join fails at make_join with a clear error.
        probe = Event(dict(pdu), "$probe", rv)
        reason = await self.handler.check_auth_against(probe, state)
        if reason is not None:
            raise forbidden(f"You are not allowed to {membership} this room: {reason}")
        return 200, {"event": pdu, "room_version": version}

    async def on_make_join(self, request: Request, ver: str, room_id: str, user_id: str) -> tuple[int, Any]:
        return await self._make_membership(request, room_id, user_id, "join", True)

    async def on_make_leave(self, request: Request, ver: str, room_id: str, user_id: str) -> tuple[int, Any]:
        return await self._make_membership(request, room_id, user_id, "leave", False)

    async def on_make_knock(self, request: Request, ver: str, room_id: str, user_id: str) -> tuple[int, Any]:
        return await self._make_membership(request, room_id, user_id, "knock", True)

    async def _receive_membership(self, request: Request, room_id: str, event_id: str,
                                  membership: str) -> tuple[str, Event, StateMap]:
        origin, body = await self._authed_body(request)
        version = await self._room_version(room_id)
        if isinstance(body, dict) and (not body.get("signatures") or not body.get("hashes")):
            raise forbidden(f"The {membership} event is not signed")
        ev = _event_for_path(get_room_version(version), body, room_id, event_id)
        if ev.type != "m.room.member" or ev.state_key != ev.sender or ev.membership != membership:
            raise bad_json(f"Not a {membership} event")
        if server_of(ev.sender) != origin:
            raise forbidden("The event's sender is not on the requesting server")
        if not await self.handler._room_allows(origin, room_id):
            self.hs.residency_policy.count_refusal(membership)
            raise forbidden("This server's residency policy does not allow your server in this room")
        if membership == "join":
            ev = await self._countersign_restricted_join(ev)
        try:
            await self.handler.on_receive_pdu(origin, ev.pdu)
        except PduRejected as e:
            raise forbidden(f"The {membership} was rejected: {e}")
        stored = await self.events.get_event(event_id)
        if stored is None or stored.rejected_reason or stored.internal.get("soft_failed"):
            raise forbidden(f"The {membership} was not accepted")
        before = await self.events.get_state_before_event(stored)
        return origin, stored, before

    async def _countersign_restricted_join(self, ev: Event) -> Event:
        """A join naming one of this server's users as its authoriser, with
        this server's signature added (server-server-api "Restricted rooms").

        The joiner's right to join through an allowed room is checked again
        on the current state; the named user's membership and power are
        checked by the auth rules when the join is received. A join naming
        another server's user is left as it is: it needs that server's
        signature, which the signature check insists on.
        """
        via = ev.content.get(AUTHORISED_VIA)
        if not isinstance(via, str) or server_of(via) != self.hs.server_name:
            return ev
        if not verify_content_hash(ev.pdu):
            raise forbidden("The join event's content hash is wrong")
        rv = ev.room_version
        restricted = self.hs.membership.restricted
        state = await self.events.get_current_state_ids(ev.room_id)
        if await restricted.needs_authoriser(rv, state, ev.sender):
            try:
                await restricted.may_join_via_allowed_room(state, ev.sender)
            except JoinNotAuthorised as e:
                raise _not_authorised(e)
        pdu = dict(ev.pdu)
        pdu["signatures"] = sign_json(prune_event_dict(rv, pdu), self.hs.server_name, self.hs.signing_key)["signatures"]
        return Event(pdu, ev.event_id, rv)

    async def on_send_join(self, request: Request, ver: str, room_id: str, event_id: str) -> tuple[int, Any]:
        origin, ev, before = await self._receive_membership(request, room_id, event_id, "join")
        state_evs = await self.events.get_events(before.values())
        chain = await self._auth_chain(list(before.values()) + ev.auth_event_ids)
        servers = sorted({server_of(sk) for (t, sk), _ in before.items() if t == "m.room.member"})
        body = {
            "origin": self.hs.server_name,
            "state": self._pdus_for(origin, state_evs.values()),
            "auth_chain": self._pdus_for(origin, chain),
            "event": ev.pdu,
            "members_omitted": False,
            "servers_in_room": servers,
        }
        if ver == "v1":
            return 200, [200, body]
        return 200, body

    async def on_send_leave(self, request: Request, ver: str, room_id: str, event_id: str) -> tuple[int, Any]:
        await self._receive_membership(request, room_id, event_id, "leave")
        return 200, ([200, {}] if ver == "v1" else {})

    async def on_send_knock(self, request: Request, ver: str, room_id: str, event_id: str) -> tuple[int, Any]:
        _, ev, before = await self._receive_membership(request, room_id, event_id, "knock")
        return 200, {"knock_room_state": await self.hs.membership.room_state_pdus(before)}

    async def on_invite(self, request: Request, ver: str, room_id: str, event_id: str) -> tuple[int, Any]:
        origin, body = await self._authed_body(request)
        if not isinstance(body, dict):
            raise bad_json("Body must be an object")
        if ver == "v2":
            pdu = body.get("event")
            version = body.get("room_version", "1")
            invite_state = body.get("invite_room_state", [])
        else:
            pdu, version, invite_state = body, "1", (body.get("unsigned") or {}).get("invite_room_state", [])
        if version not in KNOWN_ROOM_VERSIONS:
            raise MatrixError(400, "M_INCOMPATIBLE_ROOM_VERSION", "Unsupported room version", room_version=version)
        blocked = getattr(self.hs.membership, "room_blocked", None)
        if blocked is not None and await blocked(room_id):
            raise forbidden("This room has been blocked on this server")
        rv = get_room_version(version)
        ev = _event_for_path(rv, pdu, room_id, event_id)
        target = ev.state_key or ""
        if ev.type != "m.room.member" or ev.membership != "invite" or server_of(target) != self.hs.server_name:
            raise bad_json("Not an invite for a user of this server")
        if server_of(ev.sender) != origin:
            raise forbidden("The inviter is not on the requesting server")
        if not self.hs.residency_policy.server_allowed(origin):
            self.hs.residency_policy.count_refusal("invite")
            raise forbidden("This server's policy does not allow invites from your server")
        if await self.hs.rooms.get_room_version(room_id) is not None and not await self.handler._room_allows(
                origin, room_id):
            # server-server-api "Server Access Control Lists" cover /invite.
            self.hs.residency_policy.count_refusal("invite")
            raise forbidden("The room's server ACL does not allow your server")
        user = await self.hs.accounts.get_user(target)
        if user is None or user["deactivated"]:
            raise not_found("Unknown user")
        await self.hs.invite_policy.check(ev.sender, target)
        try:
            await self.hs.keyring.verify_event(rv, ev.pdu)
        except Exception as e:
            raise forbidden(f"Bad signature on the invite: {e}")
        _, signed = hash_and_sign_event(rv, ev.pdu, self.hs.server_name, self.hs.signing_key)
        stored = dict(signed)
        if isinstance(invite_state, list):
            stored["unsigned"] = {"invite_room_state": _stripped(invite_state)}
        invite_ev = Event(stored, event_id, rv)
        if await self.events.get_event(event_id) is None and not await self.hs.membership.host_in_room(room_id):
            await self.handler.store_membership_outlier(invite_ev, version)
        return 200, ({"event": signed} if ver == "v2" else [200, {"event": signed}])

    # -- reading ---------------------------------------------------------------------------------
    async def on_backfill(self, request: Request, ver: str, room_id: str) -> tuple[int, Any]:
        origin = await self._auth(request)
        await self._origin_in_room(origin, room_id)
        start = query_args(request, "v")
        limit = min(max(query_int(request, "limit", 10) or 10, 1), MAX_BACKFILL)
        out: list[Event] = []
        seen: set[str] = set()
        frontier = list(start)
        # Breadth-first back through prev_events, bounded by limit.
        for _ in range(limit * 4):
            if not frontier or len(out) >= limit:
                break
            evs = await self.events.get_events(frontier)
            frontier = []
            for e in sorted(evs.values(), key=lambda x: -x.depth):
                if e.event_id in seen or e.room_id != room_id:
                    continue
                seen.add(e.event_id)
                out.append(e)
                frontier.extend(p for p in e.prev_event_ids if p not in seen)
        return 200, {"origin": self.hs.server_name, "origin_server_ts": int(time.time() * 1000),
                     "pdus": self._pdus_for(origin, out[:limit])}

    async def on_timestamp_to_event(self, request: Request, ver: str, room_id: str) -> tuple[int, Any]:
        """Spec: server-server-api "GET /_matrix/federation/v1/timestamp_to_event/{roomId}"."""
        from zhome.rooms.timestamps import timestamp_to_event_for_server

        origin = await self._auth(request)
        await self._origin_in_room(origin, room_id)
        return 200, await timestamp_to_event_for_server(self.events, request, room_id)

    async def on_get_missing_events(self, request: Request, ver: str, room_id: str) -> tuple[int, Any]:
        origin, body = await self._authed_body(request)
        await self._origin_in_room(origin, room_id)
        if not isinstance(body, dict):
            raise bad_json("Body must be an object")
        earliest = set(body.get("earliest_events") or [])
        latest = body.get("latest_events") or []
        limit = body.get("limit", 10)
        min_depth = body.get("min_depth", 0)
        if not isinstance(limit, int) or not isinstance(latest, list) or not isinstance(min_depth, int):
            raise bad_json("Bad get_missing_events request")
        limit = max(0, min(limit, 50))
        found: list[Event] = []
        seen = set(latest) | earliest
        starts = await self.events.get_events([e for e in latest if isinstance(e, str)])
        frontier = [p for e in starts.values() for p in e.prev_event_ids if p not in seen]
        for _ in range(limit + 1):
            if not frontier or len(found) >= limit:
                break
            evs = await self.events.get_events(frontier)
            frontier = []
            for e in evs.values():
                if e.event_id in seen or e.depth < min_depth or e.room_id != room_id:
                    continue
                seen.add(e.event_id)
                if not e.rejected_reason:
                    found.append(e)
                frontier.extend(p for p in e.prev_event_ids if p not in seen)
        found.sort(key=lambda e: e.depth)
        return 200, {"events": self._pdus_for(origin, found[-limit:]) if limit else []}

    async def _state_at(self, request: Request, room_id: str) -> tuple[str, StateMap, list[Event]]:
        origin = await self._auth(request)
        event_id = query_arg(request, "event_id")
        if event_id is None:
            raise MatrixError(400, "M_MISSING_PARAM", "event_id is required")
        await self._origin_in_room(origin, room_id)
        ev = await self.events.get_event(event_id)
        # Outliers have no known state; rejected events are never served.
        if ev is None or ev.room_id != room_id or ev.internal.get("outlier") or ev.rejected_reason:
            raise not_found("Event not found")
        state = await self.events.get_state_before_event(ev)
        chain = await self._auth_chain(list(state.values()))
        return origin, state, chain

    async def on_state(self, request: Request, ver: str, room_id: str) -> tuple[int, Any]:
        origin, state, chain = await self._state_at(request, room_id)
        evs = await self.events.get_events(state.values())
        return 200, {"pdus": self._pdus_for(origin, evs.values()), "auth_chain": self._pdus_for(origin, chain)}

    async def on_state_ids(self, request: Request, ver: str, room_id: str) -> tuple[int, Any]:
        _, state, chain = await self._state_at(request, room_id)
        return 200, {"pdu_ids": list(state.values()), "auth_chain_ids": [e.event_id for e in chain]}

    async def on_event(self, request: Request, ver: str, event_id: str) -> tuple[int, Any]:
        origin = await self._auth(request)
        ev = await self.events.get_event(event_id)
        if ev is None or ev.rejected_reason:
            raise not_found("Event not found")
        await self._origin_in_room(origin, ev.room_id)
        return 200, {"origin": self.hs.server_name, "origin_server_ts": int(time.time() * 1000),
                     "pdus": [self._pdu_for(origin, ev)]}

    async def on_event_auth(self, request: Request, ver: str, room_id: str, event_id: str) -> tuple[int, Any]:
        origin = await self._auth(request)
        await self._origin_in_room(origin, room_id)
        ev = await self.events.get_event(event_id)
        if ev is None or ev.room_id != room_id:
            raise not_found("Event not found")
        chain = await self._auth_chain(ev.auth_event_ids)
        return 200, {"auth_chain": self._pdus_for(origin, chain)}

    async def on_query_directory(self, request: Request, ver: str) -> tuple[int, Any]:
        await self._auth(request)
        alias = query_arg(request, "room_alias")
        if not alias:
            raise MatrixError(400, "M_MISSING_PARAM", "room_alias is required")
        # An application service's alias may be made on demand.
        found = await self.hs.room_servlets.local_alias(alias)
        if found is None:
            raise not_found("Room alias not found")
        servers = {self.hs.server_name} | {server_of(u) for u in await self.events.get_joined_users(found[0])}
        return 200, {"room_id": found[0], "servers": sorted(servers)}

    async def on_query_profile(self, request: Request, ver: str) -> tuple[int, Any]:
        await self._auth(request)
        user_id = query_arg(request, "user_id")
        field = query_arg(request, "field")
        if not user_id:
            raise MatrixError(400, "M_MISSING_PARAM", "user_id is required")
        if server_of(user_id) != self.hs.server_name:
            raise MatrixError(400, "M_INVALID_PARAM", "Not a user of this server")
        profile = await self.hs.accounts.get_profile(user_id)
        if profile is None and self.hs.appservices and await self.hs.appservices.query_user(user_id):
            # Spec: application-service-api "Querying": the service made it.
            profile = await self.hs.accounts.get_profile(user_id)
        if profile is None:
            raise not_found("Profile not found")
        from zhome.util.ids import PROFILE_KEY

        out: dict[str, Any] = {k: v for k, v in profile.items() if v is not None}
        out.update(await self.hs.accounts.get_profile_fields(user_id))
        if field is not None:
            if not PROFILE_KEY.match(field):
                raise MatrixError(400, "M_INVALID_PARAM", "Unknown profile field")
            out = {field: out[field]} if field in out else {}
        return 200, out

    async def on_user_devices(self, request: Request, ver: str, user_id: str) -> tuple[int, Any]:
        await self._auth(request)
        if server_of(user_id) != self.hs.server_name:
            raise MatrixError(400, "M_INVALID_PARAM", "Not a user of this server")
        devices = await self.hs.accounts.get_devices(user_id)
        keys = (await self.hs.e2e_keys.store.get_device_keys([user_id])).get(user_id, {})
        out = []
        for d in devices:
            entry: dict[str, Any] = {"device_id": d["device_id"]}
            if d.get("display_name") is not None:
                entry["device_display_name"] = d["display_name"]
            if d["device_id"] in keys:
                entry["keys"] = keys[d["device_id"]]
            out.append(entry)
        stream_id = await self.hs.device_lists.store.latest_stream_id(user_id)
        return 200, {"user_id": user_id, "stream_id": stream_id, "devices": out,
                     **await self.hs.cross_signing.keys_for_user_devices(user_id)}

    async def on_user_keys_query(self, request: Request, ver: str) -> tuple[int, Any]:
        origin, body = await self._authed_body(request)
        if not isinstance(body, dict):
            raise bad_json("Body must be an object")
        from zhome.e2ee.keys import parse_device_keys_request

        wanted = parse_device_keys_request(body.get("device_keys"))
        return 200, {"device_keys": await self.hs.e2e_keys.query_local(wanted),
                     **await self.hs.cross_signing.query_for_federation(list(wanted))}

    async def on_user_keys_claim(self, request: Request, ver: str) -> tuple[int, Any]:
        origin, body = await self._authed_body(request)
        if not isinstance(body, dict):
            raise bad_json("Body must be an object")
        from zhome.e2ee.keys import parse_claim_request

        wanted = parse_claim_request(body.get("one_time_keys"))
        return 200, {"one_time_keys": await self.hs.e2e_keys.claim_local(wanted)}

    async def on_public_rooms(self, request: Request, ver: str) -> tuple[int, Any]:
        body = self._body(request) if request.method == b"POST" else None
        await self._auth(request, body)
        rooms = self.hs.room_servlets
        if isinstance(body, dict):
            flt = body.get("filter") or {}
            term = flt.get("generic_search_term") if isinstance(flt, dict) else None
            return 200, await rooms._public_rooms(body.get("limit"), body.get("since"), term, None)
        return 200, await rooms._public_rooms(query_int(request, "limit"), query_arg(request, "since"), None, None)



def _stripped(events: list[Any]) -> list[dict[str, Any]]:
    """Invite or knock room state (full PDUs since spec v1.16) as the
    stripped state events clients get."""
    out = []
    for e in events[:50]:
        if isinstance(e, dict) and isinstance(e.get("type"), str) and isinstance(e.get("content"), dict):
            out.append({k: e[k] for k in ("type", "state_key", "content", "sender") if k in e})
    return out


def _not_authorised(e: JoinNotAuthorised) -> MatrixError:
    return MatrixError(e.status, e.errcode, e.msg)


def _event_for_path(rv: RoomVersion, pdu: Any, room_id: str, event_id: str) -> Event:
    """The event a membership endpoint received, which must be the one its path names."""
    try:
        ev = parse_pdu(rv, _strip_pdu(pdu if isinstance(pdu, dict) else {}))
    except PduRejected as e:
        raise bad_json(str(e))
    if ev.event_id != event_id or ev.room_id != room_id:
        raise bad_json("Event ID or room ID does not match the path")
    return ev


def _event_id_guess(pdu: Any, version: str | None) -> str:
    """An identifier for a PDU's result entry even when it fails to parse.

    The event ID depends on the room version (its redaction algorithm), so
    use the room's version when we know the room; a guess otherwise.
    """
    if isinstance(pdu, dict):
        from zhome.crypto.event_hashing import compute_event_id
        from zhome.rooms.versions import EventIdFormat

        try:
            rv = get_room_version(version if version in KNOWN_ROOM_VERSIONS else "10")
            if rv.event_id_format is EventIdFormat.SERVER_CHOSEN or not isinstance(pdu.get("room_id"), str):
                return pdu["event_id"] if isinstance(pdu.get("event_id"), str) else "$invalid"
            return compute_event_id(rv, _strip_pdu(pdu))
        except Exception:
            pass
    return "$invalid"

