"""Builds every component once and wires them by explicit arguments.

``HomeServer.setup()`` opens the database, applies migrations, loads the
signing key and creates stores and services; ``start_listening()`` binds
the listeners from the config. ``run(config)`` does both under the reactor.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Awaitable, Callable, cast

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Histogram, generate_latest
from twisted.internet import defer
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from zhome.admin.destinations import DestinationServlets
from zhome.admin.export import ExportServlets
from zhome.admin.invite_permissions import InvitePermissionServlets
from zhome.admin.transfer import TransferServlets
from zhome.admin.media import AdminMediaServlets
from zhome.admin.notices import ServerNoticeServlets
from zhome.admin.encryption import EncryptionServlets
from zhome.admin.privacy import PrivacyServlets
from zhome.admin.reports import ReportServlets
from zhome.admin.rooms import AdminRoomServlets
from zhome.admin.servlets import AdminServlets
from zhome.client.account import AccountServlets
from zhome.client.rooms import RoomServlets
from zhome.client.sync import SyncServlets
from zhome.config import HomeserverConfig
from zhome.crypto.keys import read_signing_key_file
from zhome.http.auth import OPERATOR_ATTR, Auth
from zhome.http.ratelimit import RateLimiter
from zhome.http.request import make_request_factory
from zhome.http.server import JsonResource
from zhome.logging_setup import setup_logging
from zhome.util.passwords import configure as configure_password_hashing
from zhome.media.upload_sink import is_upload
from zhome.push.cache import RulesetCache
from zhome.push.notifications import NotificationLog
from zhome.push.unread import UnreadRecount
from zhome.rooms.event_creation import EventCreator
from zhome.rooms.guest_access import GuestAccessEnforcer
from zhome.rooms.membership import MembershipService
from zhome.rooms.persistence import Persister
from zhome.rooms.room_creation import RoomCreationService
from zhome.rooms.visibility import Visibility
from zhome.storage.accounts import AccountsStore
from zhome.storage.admin import AdminStore
from zhome.storage.audit import AuditLog
from zhome.storage.privacy import PrivacyStore
from zhome.storage.database import Database
from zhome.storage.events import EventsStore
from zhome.storage.ids import IdGenerator
from zhome.storage.migrations import prepare_database
from zhome.storage.notifications import NotificationsStore
from zhome.storage.presence import PresenceStore
from zhome.storage.pushers import PushersStore
from zhome.storage.rooms import RoomsStore
from zhome.storage.user_data import UserDataStore
from zhome.storage.user_directory import UserDirectoryStore
from zhome.sync.handler import SyncHandler
from zhome.sync.notifier import Notifier
from zhome.sync.presence import PresenceService
from zhome.sync.typing import TypingService
from zhome.util.reactor import reactor

logger = logging.getLogger("zhome.server")

FEDERATION_MAX_BODY = 10 * 1024 * 1024

DB_SECONDS = Histogram("zhome_db_interaction_seconds", "Database interactions by description", ["desc"],
                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
# desc -> its labelled histogram (a few dozen descriptions, looked up on
# every interaction).
_DB_SECONDS_BY_DESC: dict[str, Any] = {}


def _observe_db_interaction(desc: str, seconds: float) -> None:
    child = _DB_SECONDS_BY_DESC.get(desc)
    if child is None:
        child = _DB_SECONDS_BY_DESC[desc] = DB_SECONDS.labels(desc)
    child.observe(seconds)


class HomeServer:
    def __init__(self, config: HomeserverConfig) -> None:
        self.config = config
        self.server_name = config.server_name
        self.registration_nonces: dict[str, float] = {}
        self.listening_ports: list[Any] = []
        self.media_repository: Any = None
        self.media_cleaner: Any = None
        #: async callables run with a user ID when the account is deactivated,
        #: each removing what one feature keeps about that user.
        self.account_purge_hooks: list[Callable[[str], Awaitable[None]]] = []

    async def setup(self) -> None:
        cfg = self.config
        from zhome.appservice.registration import load_registrations

        # Before anything else: a broken registration stops start-up at once.
        app_services = load_registrations(cfg.app_service_config_files, cfg.server_name)
        self.signing_keys = read_signing_key_file(cfg.signing_key_path)
        self.signing_key = self.signing_keys[0]
        ph = cfg.password_hashing
        configure_password_hashing(ph.argon2_time_cost, ph.argon2_memory_kib, ph.scheme, ph.bcrypt_rounds)
        os.makedirs(cfg.data_dir, exist_ok=True)
        if cfg.database.engine == "sqlite3" and cfg.database.args.get("database", ":memory:") != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(cfg.database.args["database"])), exist_ok=True)
        self.db = Database(cfg.database.engine, dict(cfg.database.args))
        self.db.on_interaction = _observe_db_interaction
        await prepare_database(self.db)

        db = self.db
        stream_ids = await IdGenerator.from_table(db, "events", "stream_ordering")
        group_ids = await IdGenerator.from_table(db, "state_groups", "id")
        from zhome.storage.at_rest import Sealer

        enc = cfg.encryption
        assert enc.key_file is not None and enc.keystore_path is not None
        self.sealer = Sealer(enc.key_file, enc.keystore_path, enabled=enc.enabled)
        self.events = EventsStore(db, stream_ids, group_ids,
                                  await IdGenerator.downward_from_table(db, "events", "stream_ordering"),
                                  sealer=self.sealer, server_name=self.server_name)
        self.accounts = AccountsStore(
            db,
            await IdGenerator.from_table(db, "access_tokens", "id"),
            await IdGenerator.from_table(db, "refresh_tokens", "id"),
            sealer=self.sealer,
        )
        self.rooms = RoomsStore(db)
        account_data_ids = await IdGenerator.from_table(db, "account_data", "stream_id")
        receipt_ids = await IdGenerator.from_table(db, "receipts", "stream_id")
        self.user_data = UserDataStore(db, account_data_ids, receipt_ids, sealer=self.sealer)

        presence_store = PresenceStore(db, await IdGenerator.from_table(db, "presence", "stream_id"))
        from zhome.storage.cross_signing import CrossSigningStore
        from zhome.storage.device_lists import DeviceListStore
        from zhome.storage.e2e_keys import E2eKeysStore
        from zhome.storage.to_device import ToDeviceStore

        device_list_ids = await IdGenerator.from_table(db, "device_list_changes", "stream_id")
        to_device_ids = IdGenerator(await ToDeviceStore.current_position(db))
        self.notifier = Notifier(stream_ids.current(), account_data_ids.current(), receipt_ids.current(),
                                 presence_pos=presence_store.current_position(),
                                 device_lists_pos=device_list_ids.current(), to_device_pos=to_device_ids.current())
        self.sync_response_cache: Any = None
        if self.config.sync.response_cache_ms > 0:
            from zhome.sync.handler import has_content
            from zhome.sync.response_cache import SyncResponseCache

            events = self.events
            self.sync_response_cache = SyncResponseCache(
                self.config.sync.response_cache_ms, self.config.sync.response_cache_max_bytes,
                lambda: events.content_epoch, has_content)
            self.notifier.wake_listeners.append(self.sync_response_cache.on_wake)
        self._setup_e2ee(E2eKeysStore(db), DeviceListStore(db, device_list_ids), ToDeviceStore(db, to_device_ids, self.sealer),
                         CrossSigningStore(db, device_list_ids))
        self._setup_key_backup()
        self._setup_dehydrated_devices()
        self.typing = TypingService(self.notifier)
        self.presence = PresenceService(presence_store, self.events, self.notifier, self.server_name,
                                        cfg.presence.enabled)
        self.persister = Persister(db, self.events, self.notifier, self.server_name)
        self.push_rules_cache = RulesetCache(self.user_data)
        self.user_data.after_user_data_deleted.append(self.push_rules_cache.invalidate)
        self.admin_store = AdminStore(db, self.accounts, await IdGenerator.from_table(db, "content_reports", "id"),
                                      self.server_name, open_pdu=self.events.open_pdu, sealer=self.sealer)
        notifications_store = NotificationsStore(db)
        self.notification_log = NotificationLog(notifications_store, self.events)
        self.persister.txn_hooks.append(self.notification_log.persist_txn_hook)
        self.user_directory = UserDirectoryStore(db, self.server_name, cfg.user_directory.search_all_users,
                                                 open_pdu=self.events.open_pdu, accounts=self.accounts,
                                                 sealer=self.sealer)
        self.persister.txn_hooks.append(self.user_directory.persist_txn_hook)
        self.persister.after_commit_hooks.append(self.notification_log.after_persist)
        self.persister.after_commit_hooks.append(self._after_persist_e2ee)
        self.persister.outlier_txn_hooks.append(self.notification_log.persist_txn_hook)
        self.persister.outlier_after_commit_hooks.append(self.notification_log.after_persist)
        self.notification_log.start()
        await self.presence.start()
        self.event_creator = EventCreator(self.server_name, self.signing_key, self.events, self.rooms,
                                          self.persister, push_rules_cache=self.push_rules_cache)
        self.membership = MembershipService(self.server_name, self.event_creator, self.events, self.accounts)
        self.membership.room_blocked = self.admin_store.is_room_blocked
        from zhome.admin.transfer import TransferStore, check_transfer

        self.transfer_store = TransferStore(db)
        await self.transfer_store.load()
        self.membership.may_transfer = self.transfer_store.may_receive

        async def transfer_check(event: Any, state: Any) -> None:
            await check_transfer(self, event, state)

        self.event_creator.pre_send_checks.append(transfer_check)
        if self.config.email_bridge.enabled:
            from zhome.rooms.email_participants import encrypted_room_guard

            self.event_creator.pre_send_checks.append(encrypted_room_guard(
                self.config.email_bridge.ghost_prefix, self.server_name, self.events))
        from zhome.admin.invite_permissions import InvitePolicy
        from zhome.admin.notices import SYSTEM_LOCALPART
        from zhome.storage.invite_permissions import InvitePermissionsStore

        invite_permissions = InvitePermissionsStore(db)
        self.invite_policy = InvitePolicy(invite_permissions, self.server_name)
        self.invite_policy.exempt.add(f"@{SYSTEM_LOCALPART}:{self.server_name}")
        self.membership.may_invite = self.invite_policy.check
        self.account_purge_hooks.append(invite_permissions.delete_for_user)
        self.audit = AuditLog(db)
        from zhome.admin.media import MediaAdminStore

        self.media_admin = MediaAdminStore(db)
        await self.media_admin.load()
        from zhome.storage.event_media import EventMediaStore
        from zhome.storage.event_search import EventSearchStore
        from zhome.storage.relations import RelationsStore

        self.event_media = EventMediaStore(db, self.events)
        # The relations index is written before the search index, which reads edits from it.
        self.relations = RelationsStore(db, self.events)
        self.persister.txn_hooks.append(self.relations.persist_txn_hook)
        self.unread_recount = UnreadRecount(self.events, notifications_store, self.relations, self.event_creator,
                                            self.persister)
        self.event_search = EventSearchStore(db, self.events, self.sealer, self.relations)
        self.persister.txn_hooks.append(self.event_search.persist_txn_hook)
        self.privacy_store = PrivacyStore(db, self.events, await IdGenerator.from_table(db, "legal_holds", "id"),
                                          self.event_search)
        self.guest_access = GuestAccessEnforcer(self.events, self.accounts, self.membership)
        self.persister.hooks.append(self.guest_access.after_persist)
        self.room_creation = RoomCreationService(self.server_name, self.event_creator, self.membership, self.rooms,
                                                 cfg.rooms.default_room_version)
        from zhome.rooms.room_upgrade import RoomUpgradeService, refuse_self_tombstone

        self.room_upgrades = RoomUpgradeService(self.server_name, self.event_creator, self.membership,
                                                self.room_creation, self.rooms, self.events)
        self.event_creator.pre_send_checks.append(refuse_self_tombstone)
        self.visibility = Visibility(self.events)
        self._setup_relations()
        self.auth = Auth(self.accounts)
        self.auth.operator_user_id = f"@zhome-operator:{self.server_name}"
        rl = cfg.rate_limits
        self.ratelimit_message = RateLimiter(rl.message.per_second, rl.message.burst_count, rl.enabled)
        self.ratelimit_registration = RateLimiter(rl.registration.per_second, rl.registration.burst_count, rl.enabled)
        self.ratelimit_login = RateLimiter(rl.login.per_second, rl.login.burst_count, rl.enabled)
        self.ratelimit_joins = RateLimiter(rl.joins.per_second, rl.joins.burst_count, rl.enabled)
        await self._setup_appservices(app_services)
        self.sync_handler = SyncHandler(self)

        self.client_resource = JsonResource(max_body_size=cfg.limits.max_request_body_size)
        self.client_resource.after_request.append(self._audit_request)
        self.federation_handler: Any = None
        self.federation_sender: Any = None
        self.edu_sender: Any = None
        self._setup_federation()
        self._setup_push(notifications_store, await PushersStore.create(db))
        await self._setup_threepids()
        for servlets in self.client_servlets():
            servlets.register_routes(self.client_resource)
        from zhome.bridges.email.links import register_for as register_email_links

        register_email_links(self, self.client_resource)
        await self._setup_federation_services()
        from zhome.media.setup import setup_media

        await setup_media(self)
        self.media_repository.is_quarantined = self.media_admin.is_quarantined
        # Guests left in rooms that closed to them while the last run stopped.
        self.guest_access.start_sweep()
        from zhome.admin.retention import RetentionJob

        self.retention = RetentionJob(self)
        self.retention.start()
        await self.push_delivery.start()
        self._setup_email_notifications()
        from zhome.storage.at_rest_backlog import SealingBacklog

        self.sealing_backlog = SealingBacklog(self)
        self.sealing_backlog.start()
        self.event_media.start()
        self.event_search.start()
        self.relations.start()

    def _setup_relations(self) -> None:
        """On the relations index (zhome/storage/relations.py, written with
        every timeline event, set up with the search index): the bundled aggregations of events
        served to clients (zhome/client/aggregations.py) and the checks on
        new relations (zhome/client/relations.py)."""
        from zhome.client.aggregations import BundledAggregations
        from zhome.client.relations import RelationChecks

        self.notification_log.threads_of = self.relations.threads_of
        self.events.bundle_aggregations = BundledAggregations(self.events, self.relations, self.visibility,
                                                              self.user_data.get_ignored_users)
        self.event_creator.pre_send_checks.append(RelationChecks(self.events, self.relations))

    async def _setup_appservices(self, services: list[Any]) -> None:
        """Application services (zhome/appservice): none configured, nothing
        hooked anywhere (the send path does not change)."""
        from zhome.appservice.http import make_request_fn
        from zhome.appservice.service import AppServices

        made: list[Any] = []

        async def request(method: str, url: str, token: str, body: Any, timeout: float) -> tuple[int, Any, str]:
            # Made on first use, like the push client.
            if not made:
                from zhome.federation.tls import FederationTLSPolicy

                made.append(make_request_fn(FederationTLSPolicy(
                    self.config.federation.verify_certificates, self.config.federation.trusted_ca_files)))
            return cast(tuple[int, Any, str], await made[0](method, url, token, body, timeout))

        self.appservices = AppServices(services, request)
        self.appservice_txns: Any = None
        if not services:
            return
        from zhome.appservice.transactions import AppServiceTransactions
        from zhome.client.serialize import serialize_events

        self.auth.appservices = self.appservices
        for s in services:
            if await self.accounts.get_user(s.sender) is None:
                await self.accounts.create_user(s.sender, None, displayname=s.sender_localpart)
        events = self.events

        async def serialize(evs: list[Any]) -> list[dict[str, Any]]:
            return await serialize_events(events, evs)

        from zhome.storage.appservice_ephemeral import AppServiceEphemeralStore

        ephemeral = AppServiceEphemeralStore(
            self.db, await IdGenerator.from_table(self.db, "appservice_ephemeral", "id"))
        txns = AppServiceTransactions(services, self.db, await IdGenerator.from_table(self.db, "appservice_queue", "id"),
                                      self.events.get_events, serialize, self.rooms.get_aliases_for_room, request,
                                      ephemeral=ephemeral)
        self.appservice_txns = txns
        self.persister.pre_hooks.append(txns.before_persist)
        self.persister.txn_hooks.append(txns.persist_txn_hook)
        self.persister.after_commit_hooks.append(txns.after_persist)
        self.persister.outlier_txn_hooks.append(txns.outlier_txn_hook)
        self.persister.outlier_after_commit_hooks.append(txns.after_persist)
        from zhome.appservice.ephemeral import EphemeralForwarder

        self.appservice_ephemeral = EphemeralForwarder(txns, self.events, self.typing, self.presence.event)
        self.typing.change_hooks.append(self.appservice_ephemeral.on_typing)
        self.user_data.receipt_hooks.append(self.appservice_ephemeral.on_receipt)
        self.presence.change_hooks.append(self.appservice_ephemeral.on_presence)
        for limiter in (self.ratelimit_message, self.ratelimit_joins):
            limiter.exempt = self.appservices.is_unlimited
        await txns.start()

    def _setup_e2ee(self, keys_store: Any, device_list_store: Any, to_device_store: Any,
                    cross_signing_store: Any) -> None:
        """Device keys, cross-signing, device lists and to-device messages (zhome/e2ee)."""
        from zhome.e2ee.cross_signing import CrossSigningService
        from zhome.e2ee.device_lists import DeviceListService
        from zhome.e2ee.keys import E2eKeysService
        from zhome.e2ee.to_device import ToDeviceService

        self.device_lists = DeviceListService(self.server_name, device_list_store, self.accounts, keys_store,
                                              self.events, self.notifier)
        self.e2e_keys = E2eKeysService(self.server_name, keys_store, self.accounts, self.device_lists)
        cache = self.sync_response_cache
        if cache is not None:
            # Key counts are in /sync answers but wake no sync.
            self.e2e_keys.on_counts_changed.append(lambda user_id: cache.on_wake((), (user_id,)))
        self.to_device_store = to_device_store
        self.to_device = ToDeviceService(self.server_name, to_device_store, self.accounts, self.notifier)
        if cache is not None:
            # Acknowledged messages leave the user's answers; no sync wakes for it.
            self.to_device.on_acknowledged.append(lambda user_id: cache.on_wake((), (user_id,)))
        # Replacing cross-signing keys needs the password (the account
        # servlets' user-interactive auth), bound late: those are built later.
        self.cross_signing = CrossSigningService(self.server_name, cross_signing_store, keys_store, self.accounts,
                                                 self.device_lists, self._require_password_uia)
        self.account_purge_hooks.append(self.cross_signing.delete_for_user)

    async def _require_password_uia(self, body: dict[str, Any], user_id: str, operation: str) -> None:
        await self.account_servlets.require_password_uia(body, user_id, operation)

    async def _setup_threepids(self) -> None:
        """3PIDs, OpenID, outbound mail (zhome/mail) and the identity service (zhome/identity)."""
        from zhome.client.threepids import ThreepidServlets
        from zhome.storage.threepids import ThreepidStore

        self.threepids = ThreepidStore(self.db, self.sealer)
        # Unbound at identity servers first, while it is known where.
        self.account_purge_hooks.append(self._unbind_threepids)
        self.account_purge_hooks.append(self.threepids.delete_for_user)
        self.account_purge_hooks.append(self.threepids.delete_openid_for_user)
        self.mail_outbox: Any = None
        self.mailer: Any = None
        email = self.config.email
        if email is not None:
            from zhome.mail.mailer import Mailer
            from zhome.mail.outbox import MailOutbox
            from zhome.mail.smtp import SmtpRelay

            self.mail_outbox = MailOutbox(
                self.db, await IdGenerator.from_table(self.db, "mail_outbox", "id"), self.sealer,
                SmtpRelay.from_config(email), min_backoff_s=email.outbox_min_backoff_ms / 1000,
                max_backoff_s=email.outbox_max_backoff_ms / 1000)
            self.mailer = Mailer(self.mail_outbox, email.notif_from, email.app_name)
        self.threepid_servlets = ThreepidServlets(
            self.auth, self.threepids, self.accounts, email, self.mailer, self.server_name,
            self.config.public_baseurl, self._require_password_uia,
            mail_ratelimit=RateLimiter(self.config.rate_limits.registration.per_second,
                                       self.config.rate_limits.registration.burst_count,
                                       self.config.rate_limits.enabled))
        self.threepid_servlets.register_federation_routes(
            self.federation_resource if self.federation_resource is not None else self.client_resource)
        if self.federation_resource is not None:
            # Reachable on the client listener too (an identity service
            # asks there when the server has no federation listener).
            self.threepid_servlets.register_federation_routes(self.client_resource)
        self._setup_identity()
        from zhome.client.well_known import WellKnownServlets

        WellKnownServlets(self.config.well_known, self.config.public_baseurl,
                          self.identity_service is not None).register_routes(self.client_resource)
        if self.mail_outbox is not None:
            self.mail_outbox.start()

    async def _unbind_threepids(self, user_id: str) -> None:
        try:
            await self.threepid_servlets.unbind_everywhere(user_id)
        except Exception:
            logger.exception("unbinding the 3PIDs of a deactivated account failed")

    def json_http(self) -> Any:
        """The JSON-over-HTTP client for identity servers, made on first use;
        outbound TLS trusts what federation trusts."""
        if getattr(self, "_json_http", None) is None:
            from zhome.federation.tls import FederationTLSPolicy
            from zhome.identity.http import make_json_client

            tls_policy = getattr(self, "federation_tls_policy", None) or FederationTLSPolicy(
                self.config.federation.verify_certificates, self.config.federation.trusted_ca_files)
            self._json_http = make_json_client(tls_policy)
        return self._json_http

    def _setup_identity(self) -> None:
        """The Identity Service API served by zhome (zhome/identity) and the
        homeserver's side of third-party invites."""
        from zhome.identity.client import IdentityClient

        from zhome.rooms.third_party_invites import ThirdPartyInvites

        self.identity_client = IdentityClient(self.json_http, self.config.public_baseurl, self.server_name,
                                              self.signing_key)
        self.threepid_servlets.identity_client = self.identity_client
        self.third_party_invites = ThirdPartyInvites(self.server_name, self.identity_client, self.membership,
                                                     self.event_creator, self.events, self.accounts,
                                                     federation_put=self.federation_client.put_json
                                                     if self.federation_client is not None else None)
        for resource in {id(r): r for r in (self.federation_resource, self.client_resource)
                         if r is not None}.values():
            # PUT in the spec; POST as identity servers (and sytest) send it.
            for method in ("PUT", "POST"):
                resource.register(method, r"/_matrix/federation/v1/3pid/onbind", self._on_3pid_onbind,
                                  "3pid_onbind")
        self.identity_service: Any = None
        if not self.config.identity_service.enabled:
            return
        from zhome.identity.service import IdentityService
        from zhome.identity.servlets import IdentityServlets
        from zhome.identity.store import IdentityStore

        store = IdentityStore(self.db, self.sealer, self.threepids)
        email = self.config.email
        self.identity_service = IdentityService(
            store, self.threepids, self.config.identity_service, self.mailer, self.signing_key, self.server_name,
            self.config.public_baseurl, email.validation_token_lifetime_ms if email else 3600 * 1000,
            self.threepids.openid_user, self.json_http,
            federation_get=self.federation_client.get_json if self.federation_client is not None else None,
            bridge=self._invite_bridge())
        events = self.events

        async def room_encrypted(room_id: str) -> bool:
            return await events.get_current_state_event_id(room_id, "m.room.encryption", "") is not None

        self.identity_service.room_encrypted = room_encrypted
        self.account_purge_hooks.append(store.delete_for_user)
        self.threepid_servlets.local_identity = self.identity_service
        IdentityServlets(self.identity_service, self.threepid_servlets.mail_ratelimit).register_routes(
            self.client_resource)
        from zhome.identity.register_page import InvitationRegistration

        InvitationRegistration(self, self.identity_service, RateLimiter(
            self.config.rate_limits.registration.per_second, self.config.rate_limits.registration.burst_count,
            self.config.rate_limits.enabled)).register_routes(self.client_resource)

    def _invite_bridge(self) -> Any:
        """The email bridge as invitation mails need it (its registration's
        as_token keys the reply addresses), or None when it is off."""
        cfg = self.config.email_bridge
        if not cfg.enabled or cfg.mail_domain is None or cfg.registration_file is None:
            return None
        import yaml

        from zhome.bridges.email.tokens import invite_key
        from zhome.identity.service import InviteBridge

        try:
            with open(cfg.registration_file, encoding="utf-8") as f:
                reg = yaml.safe_load(f)
        except OSError:
            return None
        token = reg.get("as_token") if isinstance(reg, dict) else None
        if not isinstance(token, str) or not token:
            return None
        return InviteBridge(token, invite_key(token), cfg.mail_domain, cfg.ghost_prefix)

    async def _on_3pid_onbind(self, request: Any) -> tuple[int, Any]:
        """server-server-api "Third-party invites": PUT /3pid/onbind."""
        from zhome.http.server import read_json_body

        await self.third_party_invites.on_bind(read_json_body(request))
        return 200, {}

    def _setup_key_backup(self) -> None:
        """Server-side key backups (zhome/e2ee/key_backup.py)."""
        from zhome.e2ee.key_backup import KeyBackupService
        from zhome.storage.key_backup import KeyBackupStore

        store = KeyBackupStore(self.db)
        self.key_backup = KeyBackupService(store)
        self.account_purge_hooks.append(store.delete_for_user)

    def _setup_dehydrated_devices(self) -> None:
        """Dehydrated devices, MSC3814 (zhome/e2ee/dehydrated_devices.py)."""
        from zhome.e2ee.dehydrated_devices import DehydratedDeviceService
        from zhome.storage.dehydrated_devices import DehydratedDevicesStore

        store = DehydratedDevicesStore(self.db)
        self.accounts.device_change_hooks.append(store.on_devices_changed_txn)
        self.dehydrated_devices = DehydratedDeviceService(store, self.accounts, self.e2e_keys, self.to_device,
                                                          self.notifier)

    def _after_persist_e2ee(self, item: Any) -> None:
        # A leave may end the last room shared with remote users, whose
        # cached device lists then go stale.
        ev = item.event
        if ev.type == "m.room.member" and ev.membership in ("leave", "ban") and ev.state_key \
                and not (item.outlier or item.backfilled or item.soft_failed or ev.rejected_reason):
            defer.ensureDeferred(self.device_lists.on_membership_left(ev.room_id, ev.state_key))

    def _setup_push(self, notifications_store: NotificationsStore, pushers: PushersStore) -> None:
        """Pushers and the delivery of notifications to push gateways."""
        from zhome.federation.tls import FederationTLSPolicy
        from zhome.push.delivery import PushDelivery, make_post_json

        self.pushers = pushers
        made: list[Any] = []

        async def post_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
            # The HTTP client (and the CA bundle behind its TLS policy) is
            # made on the first push: a server nobody registered a pusher
            # on never holds them in memory.
            if not made:
                # Outbound TLS trusts what federation trusts: the system CAs
                # plus federation.trusted_ca_files.
                tls_policy = getattr(self, "federation_tls_policy", None) or FederationTLSPolicy(
                    self.config.federation.verify_certificates, self.config.federation.trusted_ca_files)
                made.append(make_post_json(tls_policy))
            return await made[0](url, body)

        notifier = self.notifier
        self.push_delivery = PushDelivery(pushers, notifications_store, self.events, post_json,
                                          lambda: notifier.events_pos)
        self.accounts.device_change_hooks.append(_delete_pushers_of_deleted_devices)
        self.accounts.after_device_deletion.append(self.push_delivery.reload_user_soon)
        self.persister.after_commit_hooks.append(self.push_delivery.after_persist)
        self.persister.outlier_after_commit_hooks.append(self.push_delivery.after_persist)

    def _setup_email_notifications(self) -> None:
        """Mails about missed messages (zhome/push/email_notify.py), when zhome sends mail."""
        self.email_notifier: Any = None
        email = self.config.email
        if email is None or self.mailer is None:
            return
        from zhome.push.email_notify import EmailNotifier, EmailNotifyStore

        store = EmailNotifyStore(self.db)
        self.account_purge_hooks.append(store.delete_for_user)
        notifier = self.notifier
        self.email_notifier = EmailNotifier(
            self, store, self.push_delivery.notifications, lambda: notifier.events_pos, email.notif_delay_ms,
            email.notif_min_interval_ms, self.config.identity_service.invite_client_location)
        self.email_notifier.start()

    def _setup_federation(self) -> None:
        """The outbound client (when enabled) and the federation + key resource."""
        cfg = self.config
        fed = cfg.federation
        from zhome.federation.destinations import DestinationPolicy

        self.destination_policy = DestinationPolicy.from_config(fed)
        self.federation_client: Any = None
        if fed.enabled:
            from zhome.federation.discovery import ServerResolver
            from zhome.federation.tls import FederationTLSPolicy
            from zhome.federation.transport import FederationClient

            if not fed.verify_certificates:
                logger.warning(
                    "federation.verify_certificates is false: other servers' TLS certificates are NOT "
                    "checked. This is for local testing only; never run a public server like this."
                )
            if fed.allow_private_addresses:
                logger.warning(
                    "federation.allow_private_addresses is true: server names may resolve to loopback "
                    "and private addresses. For local testing only."
                )
            self.federation_tls_policy = FederationTLSPolicy(fed.verify_certificates, fed.trusted_ca_files)
            self.server_resolver = ServerResolver(
                allow_private_addresses=fed.allow_private_addresses, tls_policy=self.federation_tls_policy
            )
            self.federation_client = FederationClient(
                self.server_name, self.signing_key, self.server_resolver, self.federation_tls_policy,
                destination_policy=self.destination_policy,
            )
        self.federation_resource: JsonResource | None = None
        if any("federation" in lst.resources for lst in cfg.listeners if lst.type == "http"):
            # One resource for /_matrix/federation/ and /_matrix/key/.
            self.federation_resource = JsonResource(max_body_size=cfg.limits.max_request_body_size)
            self.federation_resource.register(
                "GET", "/_matrix/federation/v1/version", self._federation_version, name="federation_version"
            )

    async def _setup_federation_services(self) -> None:
        """Keys, the residency policy, the inbound handler and the outbound queue."""
        from zhome.federation.key_resource import KeyServlets
        from zhome.federation.keyring import Keyring
        from zhome.federation.policy import ResidencyPolicy

        fetch = None
        if self.federation_client is not None:
            client = self.federation_client

            async def fetch(destination: str, path: str) -> Any:
                return await client.get_json(destination, path, signed=False, timeout=30)

        from zhome.crypto.keys import old_keys_path, read_old_verify_keys

        old_keys = read_old_verify_keys(old_keys_path(self.config.signing_key_path))
        self.keyring = Keyring(self.server_name, self.signing_keys, old_keys, self.db, fetch)
        self.residency_policy = ResidencyPolicy(self.server_name, self.destination_policy)
        if self.federation_resource is not None:
            KeyServlets(self.keyring).register_routes(self.federation_resource)
        if self.federation_client is None:
            return
        from zhome.federation.edus import EduSender
        from zhome.federation.handler import FederationHandler
        from zhome.federation.sender import FederationSender
        from zhome.federation.servlets import FederationServlets

        self.federation_handler = FederationHandler(self)
        self.membership.federation = self.federation_handler
        queue_ids = await IdGenerator.from_table(self.db, "federation_outbound", "id")
        self.federation_sender = FederationSender(
            self.server_name, self.db, queue_ids, self.federation_client.put_json, self.events.get_events,
            self.residency_policy, max_retry_interval_ms=self.config.federation.max_retry_interval_ms,
            sealer=self.sealer)
        self.federation_sender.may_transfer = self.transfer_store.may_receive
        self.persister.pre_hooks.append(self.federation_sender.before_persist)
        self.persister.txn_hooks.append(self.federation_sender.persist_txn_hook)
        self.persister.after_commit_hooks.append(self.federation_sender.after_persist)
        self.edu_sender = EduSender(self)
        sender, client = self.federation_sender, self.federation_client
        self.device_lists.queue_edu = sender.queue_edu
        self.to_device.queue_edu = sender.queue_edu
        self.device_lists.fetch = client.get_json
        self.e2e_keys.post = client.post_json
        self.cross_signing.post = client.post_json
        self.typing.on_local_typing = self.edu_sender.on_local_typing
        self.presence.send_to_servers = self.edu_sender.presence
        self.persister.after_commit_hooks.append(self.edu_sender.after_persist_presence)
        if self.federation_resource is not None:
            FederationServlets(self).register_routes(self.federation_resource)
        await self.federation_sender.start()

    def _body_limit_for(self, path: bytes) -> int:
        """The largest request body accepted on ``path`` (checked as it arrives)."""
        if path.startswith((b"/_matrix/media/", b"/_matrix/client/v1/media/")):
            repo = self.media_repository
            return int(repo.max_upload_size) + 64 * 1024 if repo is not None else self.config.limits.max_upload_size
        if path.startswith(b"/_matrix/federation/"):
            # A full transaction (50 PDUs, 100 EDUs) may exceed the client limit.
            return max(self.config.limits.max_request_body_size, FEDERATION_MAX_BODY)
        return self.config.limits.max_request_body_size

    def _body_sink_for(self, method: bytes, path: bytes) -> Any:
        """Upload bodies go straight into encryption (see media.upload_sink)."""
        repo = self.media_repository
        if repo is None or not is_upload(method, path):
            return None
        return repo.new_upload_body()

    async def _federation_version(self, request: Any) -> tuple[int, Any]:
        return 200, {"server": {"name": "zhome", "version": _version()}}

    def _listener_root(self, listener: Any) -> Resource:
        federation = self.federation_resource if "federation" in listener.resources else None
        if "client" not in listener.resources and federation is not None:
            return _ListenerRoot(federation, None)
        return _ListenerRoot(self.client_resource, federation)

    def client_servlets(self) -> list[Any]:
        from zhome.client.presence import PresenceServlets
        from zhome.client.pushers import PusherServlets
        from zhome.client.user_data import UserDataServlets
        from zhome.client.room_summary import RoomSummaryServlets
        from zhome.client.voip import VoipServlets
        from zhome.client.timestamps import TimestampServlets
        from zhome.client.relations import RelationServlets

        from zhome.client.legacy import LegacyServlets
        from zhome.e2ee.servlets import E2eeServlets

        from zhome.client.room_upgrades import RoomUpgradeServlets
        from zhome.client.mutual_rooms import MutualRoomsServlets
        from zhome.client.spaces import SpaceServlets

        from zhome.rooms.previews import RoomPreviews

        self.room_servlets = RoomServlets(self)
        self.room_previews = RoomPreviews(self.events, self.room_servlets.room_summary)
        self._setup_space_hierarchy()
        room_servlets = self.room_servlets

        def aliases_moved(old_room: str, new_room: str) -> None:
            room_servlets.alias_changed(old_room)
            room_servlets.alias_changed(new_room)

        self.room_upgrades.aliases_moved.append(aliases_moved)
        self.membership.after_join.append(self.room_upgrades.on_local_join)
        user_data_servlets = UserDataServlets(self)
        self.room_upgrades.copy_user_settings = user_data_servlets.copy_room_settings
        legacy = LegacyServlets(self.auth, self.events, self.user_data, self.rooms, self.notifier, self.typing,
                                self.visibility, self.room_servlets, presence=self.presence)
        e2ee = E2eeServlets(self.auth, self.e2e_keys, self.to_device, self.device_lists, self.events, self.notifier,
                            self.cross_signing)
        self.account_servlets = AccountServlets(self)
        from zhome.client.search import SearchServlets

        search = SearchServlets(self.auth, self.events, self.visibility, self.event_search, self.user_data,
                                self.notifier)
        return [self.account_servlets, self.threepid_servlets, self.room_servlets, SyncServlets(self), user_data_servlets, legacy,
                PresenceServlets(self.auth, self.accounts, self.events, self.presence, self.server_name), e2ee,
                PusherServlets(self), VoipServlets(self.auth, self.config.voip),
                RoomSummaryServlets(self.auth, self.room_previews, self.room_servlets.resolve_room),
                RoomUpgradeServlets(self.auth, self.room_upgrades, self.ratelimit_joins),
                SpaceServlets(self.auth, self.space_hierarchy), MutualRoomsServlets(self.auth, self.events),
                RelationServlets(self),
                AdminServlets(self), ReportServlets(self), AdminRoomServlets(self), PrivacyServlets(self),
                EncryptionServlets(self),
                AdminMediaServlets(self), DestinationServlets(self), ServerNoticeServlets(self), ExportServlets(self),
                TransferServlets(self), InvitePermissionServlets(self),
                TimestampServlets(self.auth, self.events, self.visibility, self.rooms.get_room_version),
                *self._backup_and_dehydration_servlets(), self._appservice_servlets(), search]

    def _setup_space_hierarchy(self) -> None:
        """The space hierarchy (zhome/rooms/spaces.py), asking other servers
        through the federation client when there is one."""
        from zhome.rooms.spaces import REMOTE_TIMEOUT_S, SpaceHierarchy

        fetch = None
        client = self.federation_client
        if client is not None:
            from urllib.parse import quote

            async def fetch(server: str, room_id: str, suggested_only: bool) -> Any:
                return await client.get_json(server, "/_matrix/federation/v1/hierarchy/" + quote(room_id, safe=""),
                                             query={"suggested_only": "true" if suggested_only else "false"},
                                             timeout=REMOTE_TIMEOUT_S)

        async def room_allows(server: str, room_id: str) -> bool:
            handler = self.federation_handler
            return True if handler is None else bool(await handler._room_allows(server, room_id))

        self.space_hierarchy = SpaceHierarchy(self.server_name, self.events, self.room_previews,
                                              self.membership.host_in_room, fetch, room_allows)

    def _appservice_servlets(self) -> Any:
        from zhome.appservice.servlets import AppServiceRoomList, AppServiceServlets

        self.appservice_room_list = AppServiceRoomList(self.db)
        rooms = self.rooms

        async def room_exists(room_id: str) -> bool:
            return await rooms.get_room_version(room_id) is not None

        return AppServiceServlets(self.auth, self.appservices, self.appservice_room_list, room_exists)

    def _backup_and_dehydration_servlets(self) -> list[Any]:
        from zhome.e2ee.dehydrated_devices import DehydratedDeviceServlets
        from zhome.e2ee.key_backup_servlets import KeyBackupServlets

        return [KeyBackupServlets(self.auth, self.key_backup),
                DehydratedDeviceServlets(self.auth, self.dehydrated_devices)]

    def _audit_request(self, request: Any, method: str, endpoint: str, code: int, errcode: Any) -> None:
        """Every admin request (allowed or refused) and every data-subject
        request (export, deactivation and erasure, the user's own transfer
        and invite settings) goes into the audit log."""
        if not (endpoint.startswith(("admin_", "zadmin_")) or endpoint == "export"
                or (endpoint == "deactivate" and method == "POST")
                or (endpoint in ("privacy_settings", "invite_permissions") and method == "PUT")):
            return
        actor = getattr(request, "zhome_user", None) or (
            "shared-secret" if endpoint == "admin_register" else "unauthenticated")
        target = dict(getattr(request, "zhome_path_args", None) or {})
        outcome = f"{code} {errcode}" if errcode else str(code)

        async def write() -> None:
            try:
                await self.audit.append(actor, f"{method} {endpoint}", target, outcome)
            except Exception:
                logger.exception("could not write the audit log entry for %s %s", method, endpoint)

        defer.ensureDeferred(write())

    def _listen_admin_socket(self) -> None:
        """The operator's admin socket: admin endpoints only, every request
        acting as a server admin (``zhome admin`` uses it)."""
        path = self.config.admin_socket_path
        if not path:
            return
        if len(path.encode()) > 100:
            logger.warning("admin socket path %s is too long for a UNIX socket; not listening on it", path)
            return
        if os.path.exists(path):
            os.unlink(path)  # left by a server that did not stop cleanly
        site = Site(cast(IResource, _OperatorRoot(self.client_resource)))
        site.requestFactory = make_request_factory(self._body_limit_for, self._body_sink_for)
        site.displayTracebacks = False
        site.noisy = False
        self.listening_ports.append(reactor.listenUNIX(path, site, mode=0o600))
        logger.info("Listening on %s (operator admin socket)", path)

    def start_listening(self) -> None:
        self._listen_admin_socket()
        tls_factory = None
        if any(lst.tls for lst in self.config.listeners):
            from zhome.federation.tls import server_context_factory

            assert self.config.tls_certificate_path and self.config.tls_private_key_path
            tls_factory = server_context_factory(self.config.tls_certificate_path, self.config.tls_private_key_path)
        for listener in self.config.listeners:
            if listener.type == "metrics":
                root: Resource = Resource()
                # A Resource provides IResource, which mypy cannot see
                # through zope's @implementer.
                root.putChild(b"metrics", cast(IResource, _MetricsResource()))
                site = Site(root)
            else:
                site = Site(self._listener_root(listener))
                site.requestFactory = make_request_factory(self._body_limit_for, self._body_sink_for)
                site.displayTracebacks = False
            site.noisy = False
            for addr in listener.bind_addresses:
                if listener.tls:
                    port = reactor.listenSSL(
                        listener.port, site, tls_factory, interface=addr
                    )
                else:
                    port = reactor.listenTCP(listener.port, site, interface=addr)
                self.listening_ports.append(port)
                logger.info(
                    "Listening on %s:%d (%s%s: %s)", addr, listener.port, listener.type,
                    ", TLS" if listener.tls else "", ", ".join(listener.resources),
                )

    async def stop_background(self) -> None:
        """Stop the background work: outbound federation, media clean-up and
        notification expiry. Never raises."""
        if getattr(self, "guest_access", None) is not None:
            await self.guest_access.stop()
        if getattr(self, "federation_sender", None) is not None:
            self.federation_sender.stop()
        if getattr(self, "appservice_txns", None) is not None:
            self.appservice_txns.stop()
        if getattr(self, "presence", None) is not None:
            self.presence.stop()
        if getattr(self, "retention", None) is not None:
            self.retention.stop()
        if getattr(self, "sealing_backlog", None) is not None:
            await self.sealing_backlog.stop()
        if getattr(self, "event_media", None) is not None:
            await self.event_media.stop()
        if getattr(self, "event_search", None) is not None:
            await self.event_search.stop()
        if getattr(self, "relations", None) is not None:
            await self.relations.stop()
        if getattr(self, "email_notifier", None) is not None:
            await self.email_notifier.stop()
        if getattr(self, "mail_outbox", None) is not None:
            await self.mail_outbox.stop()
        if getattr(self, "push_delivery", None) is not None:
            try:
                await self.push_delivery.stop()
            except Exception:
                logger.exception("stopping push delivery failed")
        for what, part in (("media cleanup", self.media_cleaner),
                           ("notification expiry", getattr(self, "notification_log", None))):
            if part is None:
                continue
            try:
                await part.stop()
            except Exception:
                logger.exception("stopping %s failed", what)

    async def stop(self) -> None:
        await self.stop_background()
        for p in self.listening_ports:
            await p.stopListening()
        await self.db.close()
        if getattr(self, "sealer", None) is not None:
            self.sealer.close()


class _ListenerRoot(Resource):
    """Routes /_matrix/federation/ and /_matrix/key/ to the federation resource
    when the listener serves it; everything else to the default resource."""

    _FEDERATION_PREFIXES = (b"/_matrix/federation/", b"/_matrix/key/")

    def __init__(self, default: JsonResource, federation: JsonResource | None) -> None:
        super().__init__()
        self.default = default
        self.federation = federation

    def _pick(self, request: Any) -> JsonResource:
        if self.federation is not None and request.path.startswith(self._FEDERATION_PREFIXES):
            return self.federation
        return self.default

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:  # noqa: N802
        return self._pick(request)

    def render(self, request: Any) -> Any:
        return self._pick(request).render(request)


class _OperatorRoot(Resource):
    """The operator's admin socket: marks each request as the operator's and
    serves only the admin API."""

    isLeaf = True
    _ADMIN_PREFIXES = (b"/_synapse/admin/", b"/_zhome/admin/", b"/_matrix/client/v1/admin/",
                       b"/_matrix/client/v3/admin/", b"/_matrix/client/r0/admin/")

    def __init__(self, inner: JsonResource) -> None:
        super().__init__()
        self.inner = inner

    def render(self, request: Any) -> Any:
        if not request.path.startswith(self._ADMIN_PREFIXES) or request.path.endswith(b"/admin/v1/register"):
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"errcode":"M_UNRECOGNIZED","error":"Only the admin API is served on this socket"}'
        setattr(request, OPERATOR_ATTR, True)
        return self.inner.render(request)


class _MetricsResource(Resource):
    """The Prometheus text exposition of every metric (GET /metrics)."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:  # noqa: N802 - Twisted's name
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(REGISTRY)


class _RootResource(Resource):
    """Every path goes to the JSON resource, which answers unknown ones."""

    def __init__(self, json_resource: JsonResource) -> None:
        super().__init__()
        self.json_resource = json_resource

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:  # noqa: N802
        return self.json_resource

    def render(self, request: Any) -> Any:
        return self.json_resource.render(request)


def _limit_malloc_arenas() -> None:
    """Keep the resident size small (glibc malloc):

    - one arena per thread (glibc's default) makes the database and I/O
      threads hold on to memory: two arenas;
    - blocks of 1 MiB and more (a password hash's 7 MiB, big responses) are
      mapped and unmapped on their own: glibc's default threshold grows
      after the first such block is freed, and every later one then stays
      in the heap for good;
    - free memory at the top of the heap goes back to the system above
      2 MiB rather than a threshold that grows the same way.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
        libc.mallopt(m_arena_max, 2)
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 2 << 20)
    except (OSError, AttributeError):
        pass


def run(config: HomeserverConfig) -> int:
    _limit_malloc_arenas()
    setup_logging(config.log_level, config.log_file, config.log_format)
    hs = HomeServer(config)
    exit_code = [0]
    bridges: list[Any] = []

    async def start() -> None:
        try:
            await hs.setup()
            hs.start_listening()
            bridge_cfg = config.email_bridge
            if bridge_cfg.enabled and bridge_cfg.in_process:
                # Only an HTTP client of this server (AS and CS APIs), even in its process.
                from zhome.bridges.email.bridge import EmailBridge, relay_settings

                bridge = await EmailBridge.create(bridge_cfg, config.server_name, config.data_dir,
                                                  seal=config.encryption.enabled, **relay_settings(config.email),
                                                  public_baseurl=config.public_baseurl)
                bridge.start()
                bridges.append(bridge)
            logger.info("zhome %s started for %s (pid %d)", _version(), config.server_name, os.getpid())
        except Exception as e:
            logger.error("Start-up failed: %s", e, exc_info=not isinstance(e, (ValueError, OSError)))
            exit_code[0] = 1
            reactor.stop()

    async def shutdown() -> None:
        for bridge in bridges:
            try:
                await bridge.stop()
            except Exception:
                logger.exception("email bridge: stopping failed")
        await hs.stop_background()
        try:
            await hs.db.close()
        except Exception:
            pass

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shutdown()))
    # Threads do file I/O, thumbnails, DNS and password hashes (one at a
    # time); the database has its own pool.
    reactor.suggestThreadPoolSize(4)
    reactor.run()
    return exit_code[0]


def _version() -> str:
    from zhome import __version__

    return __version__


def _delete_pushers_of_deleted_devices(txn: Any, user_id: str, device_ids: list[str], deleted: bool) -> None:
    if deleted:
        PushersStore.delete_for_devices_txn(txn, user_id, device_ids)
