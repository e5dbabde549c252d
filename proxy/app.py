"""Composition root: one root nursery running the proxy, HTTP and admin.

``App.run`` starts everything and returns after a graceful shutdown:
SIGTERM/SIGINT stop the listeners, idle sessions close at once, busy ones
finish their statement and open transaction within ``shutdown_grace``, then
whatever is left is cancelled.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Iterable
from typing import Any

import trio

from proxy.backends import (
    BackendUnavailable,
    Credentials,
    Endpoint,
    connect,
    make_client_tls_context,
    probe_handshake,
)
from proxy.config import BackendConfig, Config, ConfigError, load_config
from proxy.events import EventLog
from proxy.metrics import Metrics
from proxy.protocol.constants import RELAYABLE, Status
from proxy.protocol.packets import Handshake
from proxy.relay import Proxy, Settings
from proxy.router import Router, SqlProber
from proxy.users import Account, UserDirectory, accounts_from_mysql_user

log = logging.getLogger("tidegate")

FALLBACK_VERSION = "5.5.5-10.11.0-MariaDB-tidegate"


def endpoint_from(backend: BackendConfig) -> Endpoint:
    context = None
    if backend.tls is not None:
        context = make_client_tls_context(
            backend.tls.ca, backend.tls.cert, backend.tls.key, backend.tls.verify
        )
    return Endpoint(
        backend.name,
        backend.host,
        backend.port,
        backend.role,
        context,
        backend.tls.server_name if backend.tls else None,
    )


def settings_from(config: Config) -> Settings:
    limits = config.limits
    client_tls = None
    if config.client_tls is not None:
        import ssl

        client_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        client_tls.load_cert_chain(config.client_tls.cert, config.client_tls.key)
        if config.client_tls.ca:
            client_tls.load_verify_locations(config.client_tls.ca)
            client_tls.verify_mode = ssl.CERT_REQUIRED
    return Settings(
        **{f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)},
        client_tls=client_tls,
        client_tls_required=bool(config.client_tls and config.client_tls.required),
        trace_tags=config.events.trace_tags,
    )


def configured_accounts(config: Config) -> list[Account]:
    accounts = []
    for user in config.users:
        if user.password is not None:
            accounts.append(Account.from_password(user.name, user.password))
        elif user.password_hash is not None:
            accounts.append(Account.from_hash(user.name, [user.password_hash]))
    return accounts


def fallback_greeting() -> Handshake:
    return Handshake(
        server_version=FALLBACK_VERSION,
        connection_id=0,
        scramble=b"\x01" * 20,
        capabilities=int(RELAYABLE),
        character_set=45,
        status=int(Status.AUTOCOMMIT),
    )


class App:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.primary = endpoint_from(config.primary)
        self.metrics = metrics
        self.users = UserDirectory(
            configured_accounts(config),
            self._load_users if (config.service_account and config.load_users_from_backend) else None,
        )
        self.proxy: Proxy | None = None
        #: the embedded migration service (None without a service account)
        self.migrations: Any = None
        #: migration, cut-over, hold and traced-statement events (``[events]``, admin ``events``)
        self.events = EventLog(config.events.file, keep=config.events.keep)
        self.primary_reachable = False
        self.shutdown_requested = trio.Event()
        #: the admin SQL port's bound address once it listens
        self.admin_listening: tuple[str, int] | None = None
        #: rules, replica health, backpressure (proxy.router); set in run()
        self.router: Router | None = None
        #: fleet-wide routing rules (proxy.fleet.FleetRules); None without the state schema
        self.fleet_rules: Any = None

    async def _load_users(self) -> list[Account]:
        service = self.config.service_account
        assert service is not None
        backend = await connect(
            self.primary,
            Credentials.from_password(*service),
            timeout=self.config.limits.connect_timeout,
        )
        try:
            result = await backend.query(
                "SELECT User, Host, plugin, authentication_string FROM mysql.user"
            )
        finally:
            await backend.aclose()
        return accounts_from_mysql_user(result.dicts())

    async def _greeting(self) -> Handshake:
        try:
            greeting = await probe_handshake(self.primary, self.config.limits.connect_timeout)
            self.primary_reachable = True
            return greeting
        except (BackendUnavailable, trio.TooSlowError, OSError) as error:
            log.warning("primary %s not reachable at start: %s", self.primary.address, error)
            return fallback_greeting()

    async def ready(self) -> tuple[bool, str]:
        proxy = self.proxy
        if proxy is None or not proxy.listening:
            return False, "proxy not listening yet"
        if proxy.draining:
            return False, "shutting down"
        try:
            with trio.fail_after(1.0):
                await probe_handshake(self.primary, 1.0)
        except (BackendUnavailable, trio.TooSlowError, OSError) as error:
            self.primary_reachable = False
            return False, f"primary {self.primary.address} unreachable: {error}"
        self.primary_reachable = True
        # Migrating is not a reason to take the pod out of service; say it, stay ready.
        holds = [h["table"] for h in proxy.gate.snapshot()]
        if holds:
            return True, "ok (holding: " + ", ".join(map(str, holds)) + ")"
        if self.migrations is not None and self.migrations.running:
            return True, "ok (migrating)"
        return True, "ok"

    def status(self) -> dict[str, object]:
        proxy = self.proxy
        sessions = list(proxy.relays.values()) if proxy else []
        return {
            "listening": [f"{h}:{p}" for h, p in proxy.listening] if proxy else [],
            "draining": bool(proxy and proxy.draining),
            "primary": {"name": self.primary.name, "address": self.primary.address,
                        "reachable": self.primary_reachable},
            "client_connections": len(sessions),
            "in_transaction": sum(1 for r in sessions if r.session.in_transaction),
            "backend_connections": proxy.backend_limiter.in_use if proxy else 0,
            "backend_queue_waiting": proxy.backend_limiter.waiting if proxy else 0,
            "migration_in_progress": bool(self.migrations and self.migrations.running),
            "migrations_led_here": sorted(self.migrations.running) if self.migrations else [],
            "hold_in_progress": bool(proxy and proxy.gate.holds),
            "holds": proxy.gate.snapshot() if proxy else [],
            "routing": self.router.summary() if self.router is not None else None,
            # every active migration as of the last poll; a pipeline waits for ready_to_cut_over
            "migrations": self.migrations.status() if self.migrations is not None else [],
        }

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        greeting = await self._greeting()
        if self.users._loader is not None:
            await self.users.refresh(force=True)
        if self.metrics is not None:
            self.metrics.declare_backends([backend.name for backend in config.backends])
        proxy = Proxy(settings_from(config), self.primary, self.users, greeting, self.metrics)
        self.proxy = proxy
        router = self._router(proxy)
        fleet = None
        service_account = config.service_account
        if service_account is not None and config.migrations_enabled:
            fleet, self.migrations = self._embedded_migrator(proxy, service_account)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.gate.run)
            await nursery.start(router.run)
            await nursery.start(proxy.serve, config.listen[0], config.listen[1])
            if self.metrics is not None:
                from proxy.http import serve_http

                await nursery.start(
                    serve_http, config.http_listen[0], config.http_listen[1], self.metrics, self
                )
            from proxy.admin import serve_admin
            from proxy.control import Control

            self.admin_listening = await nursery.start(serve_admin, Control(self), config.admin)
            if fleet is not None and self.migrations is not None:
                await nursery.start(fleet.run)
                await nursery.start(self.migrations.run)
            if threading.current_thread() is threading.main_thread():
                nursery.start_soon(self._watch_signals, nursery)
            log.info(
                "tidegate listening on %s, primary %s (%s)",
                ", ".join(f"{h}:{p}" for h, p in proxy.listening),
                self.primary.address,
                greeting.server_version,
            )
            task_status.started(proxy)
            await self.shutdown_requested.wait()
            if fleet is not None:
                await fleet.deregister()
            await self._drain(nursery)

    def _router(self, proxy: Proxy) -> Router:
        """The router; ``proxy.routing`` points at it only while it has work to do."""
        config = self.config
        endpoints = [self.primary, *(endpoint_from(backend) for backend in config.replicas)]
        service = config.service_account
        credentials: dict[str, Credentials] = {}
        for backend in config.backends:
            if backend.user is not None and backend.role == "replica":
                credentials[backend.name] = Credentials.from_password(backend.user, backend.password or "")
            elif service is not None:
                credentials[backend.name] = Credentials.from_password(*service)
        prober = (
            SqlProber(self.primary, credentials, config.limits.connect_timeout) if config.replicas else None
        )
        router = Router(
            config.routing,
            config.backpressure,
            endpoints,
            config.rules,
            prober=prober,
            classifier=proxy.gate.classifier,
            metrics=self.metrics,
            migration_lags=self._migration_lags if config.backpressure.max_migration_lag is not None else None,
            connect_timeout=config.limits.connect_timeout,
        )
        router.attach(proxy)
        if self.metrics is not None:
            self.metrics.watch_routing(router)
        self.router = router
        return router

    def _migration_lags(self) -> list[tuple[str, float]]:
        """Binlog lag of every running migration, whichever sidecar leads it, by schema.table."""
        service = self.migrations
        if service is None:
            return []
        from proxy.migrations import migration_lags

        return migration_lags(service.active)

    def _embedded_migrator(self, proxy: Proxy, service_account: tuple[str, str]) -> tuple[Any, Any]:
        """Fleet membership and the migration service (the only place proxy meets migrator)."""
        from proxy.blockers import ClientSession, local_sessions
        from proxy.fleet import Fleet, ServiceDatabase
        from proxy.hooks import HOOKS, HookSettings
        from proxy.migrations import STATES, MigrationService

        credentials = Credentials.from_password(*service_account)
        database = ServiceDatabase(self.primary, credentials, self.config.limits.connect_timeout)
        listen = f"{self.config.listen[0]}:{self.config.listen[1]}"
        fleet = Fleet(database, proxy.gate, schema=self.config.state_schema, listen=listen)
        if self.router is not None:
            from proxy.fleet import FleetRules

            fleet.rules = self.fleet_rules = FleetRules(
                fleet, self.router, follow=self.config.routing.fleet_rules, interval=fleet.heartbeat_interval
            )
        metrics = self.metrics
        attempts_seen: dict[int, int] = {}

        def on_progress(request_id: int, progress: Any) -> None:
            if metrics is None:
                return
            name = str(request_id)
            ratio = progress.rows_copied / progress.rows_estimate if progress.rows_estimate else 0.0
            metrics.migration_update(name, str(progress.phase), min(ratio, 1.0), progress.rows_copied,
                                     float(getattr(progress, "binlog_lag_seconds", 0.0) or 0.0), STATES)
            # An attempt is over once the phase has left cutting_over: back to
            # ready/postponed means it was rolled back; complete means success.
            phase = str(progress.phase)
            attempts = int(getattr(progress, "cut_over_attempts", 0) or 0)
            previous = attempts_seen.get(request_id, 0)
            if phase == "complete" and attempts > previous:
                for _ in range(previous, attempts - 1):
                    metrics.cutover_attempt("lock_timeout")
                metrics.cutover_attempt("success")
                attempts_seen[request_id] = attempts
            elif phase in ("ready", "postponed") and attempts > previous:
                for _ in range(previous, attempts):
                    metrics.cutover_attempt("lock_timeout")
                attempts_seen[request_id] = attempts

        def on_cutover(result: str) -> None:
            if metrics is not None:
                metrics.cutover_attempt(result)

        def sessions(tables: Iterable[str]) -> list[ClientSession]:
            return local_sessions(proxy, fleet.id, tables)

        fleet.sessions = sessions
        fleet.events = proxy.gate.events = self.events
        self.events.source = fleet.id
        hooks = self.config.hooks
        service = MigrationService(
            self.primary, service_account, fleet, schema=self.config.state_schema,
            on_progress=on_progress, on_cutover=on_cutover, events=self.events, local_sessions=sessions,
            hooks=HookSettings(
                {name: getattr(hooks, name) for name in HOOKS if getattr(hooks, name)},
                hooks.timeout, hooks.retry_interval, hooks.allow_option_commands,
            ),
        )
        proxy.gate.set_dependents(service.dependents)
        return fleet, service

    async def _watch_signals(self, nursery: trio.Nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                self.shutdown_requested.set()
                return

    async def _drain(self, nursery: trio.Nursery) -> None:
        proxy = self.proxy
        assert proxy is not None
        proxy.begin_shutdown()
        grace = self.config.limits.shutdown_grace
        with trio.move_on_after(grace):
            while proxy.relays:
                await trio.sleep(0.02)
        if proxy.relays:
            log.warning("%d sessions still open after %.1fs grace; closing them", len(proxy.relays), grace)
        nursery.cancel_scope.cancel()

    def shutdown(self) -> None:
        self.shutdown_requested.set()


def serve_main(argv: list[str]) -> int:
    try:
        config = load_config(argv)
        _ = config.primary
    except ConfigError as error:
        print(f"tidegate: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = App(config, Metrics())
    try:
        trio.run(app.run)
    except KeyboardInterrupt:
        return 130
    return 0

