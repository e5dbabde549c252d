"""What operators can see and do, independent of how they ask.

The admin SQL port, ``/status`` and tests all go through this facade; it
reads live state from the proxy, the gate and the migration service and
forwards commands.  Reads are plain synchronous snapshots (rows as dicts);
commands are trio-async and raise ``ControlError`` with a message meant for
the operator.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from proxy.app import App
    from proxy.router import Router

Row = dict[str, Any]


class ControlError(Exception):
    """A bad request from an operator: the message says what is wrong."""


class Control:
    def __init__(self, app: App) -> None:
        self.app = app

    # -- reads -------------------------------------------------------------

    def sessions(self) -> list[Row]:
        proxy = self.app.proxy
        if proxy is None:
            return []
        now = time.time()
        rows = []
        for relay in list(proxy.relays.values()):
            session = relay.session
            started = session.transaction_started
            rows.append(
                {
                    "id": session.connection_id,
                    "user": session.user,
                    "client": session.peer,
                    "schema": session.schema,
                    "backend_connection_id": relay.backend.connection_id if relay.backend else None,
                    "in_transaction": session.in_transaction,
                    "transaction_seconds": round(now - started, 3) if started else None,
                    "autocommit": session.autocommit,
                    "statement": session.current,
                    "held": session.held,
                    "queries": session.queries,
                    "prepared_statements": len(session.prepared),
                    "connected_seconds": round(now - session.connected_at, 3),
                    "tags": ",".join(f"{k}={v}" for k, v in session.attributes.items() if k.startswith("tidegate")),
                    "replica": relay.replica.name if relay.replica is not None else None,
                    "pinned": relay.pinned,
                }
            )
        return rows

    def backends(self) -> list[Row]:
        app = self.app
        proxy = app.proxy
        router = getattr(app, "router", None)
        counts = getattr(proxy, "backend_counts", {}) if proxy is not None else {}
        rows = []
        for backend in app.config.backends:
            primary = backend.role == "primary"
            health = router.replicas.get(backend.name) if router is not None else None
            if primary:
                state = "up" if app.primary_reachable else "down"
            else:
                state = health.state if health is not None else "unknown"
            rows.append(
                {
                    "name": backend.name,
                    "role": backend.role,
                    "address": f"{backend.host}:{backend.port}",
                    "tls": backend.tls is not None,
                    "reachable": app.primary_reachable if primary else None,
                    "connections": counts.get(backend.name, 0),
                    "queue_waiting": proxy.backend_limiter.waiting if proxy and primary else 0,
                    "health": state,
                    "lag_seconds": None if health is None or health.lag is None else round(health.lag, 3),
                    "sql_running": None if health is None else health.sql_running,
                    "io_running": None if health is None else health.io_running,
                    "routed": router.routed.get(backend.name, 0) if router is not None else 0,
                    "error": None if health is None else health.error,
                }
            )
        return rows

    # -- routing rules (staged, then applied) ----------------------------------

    def _router(self) -> Router:
        router = getattr(self.app, "router", None)
        if router is None:
            raise ControlError("routing is not running yet")
        return cast("Router", router)

    def rules(self) -> list[Row]:
        router = getattr(self.app, "router", None)
        return [] if router is None else list(router.rule_rows())

    def stage_rules(self, rows: list[dict[str, Any]]) -> list[int]:
        """Stage new rules (all or none); raises ``RuleError`` for a bad one."""
        router = self._router()
        before = dict(router.staged)
        try:
            return [router.stage_insert(row).id for row in rows]
        except BaseException:
            router.staged = before
            raise

    def change_rule(self, rule_id: int, changes: dict[str, Any]) -> int:
        return self._router().stage_update(rule_id, changes).id

    def delete_rule(self, rule_id: int) -> None:
        self._router().stage_delete(rule_id)

    def apply_rules(self) -> tuple[int, int]:
        """Staged → live in one step; (rules, active rules).  Raises ``RuleError``, live unchanged."""
        rules = self._router().apply()
        return len(rules.specs), len(rules)

    def discard_rules(self) -> None:
        self._router().discard()

    def rules_pending(self) -> bool:
        router = getattr(self.app, "router", None)
        return bool(router is not None and router.pending)

    def holds(self) -> list[Row]:
        proxy = self.app.proxy
        if proxy is None:
            return []
        live = [dict(row, state="active") for row in proxy.gate.snapshot()]
        past = [dict(row, state="finished") for row in reversed(proxy.gate.history)]
        return live + past

    def stats(self) -> list[Row]:
        app = self.app
        proxy = app.proxy
        metrics = app.metrics
        rows: list[Row] = []

        def add(name: str, value: Any) -> None:
            rows.append({"name": name, "value": value})

        if proxy is not None:
            add("client_connections", len(proxy.relays))
            add("sessions_in_transaction", sum(1 for r in proxy.relays.values() if r.session.in_transaction))
            add("backend_connections", proxy.backend_limiter.in_use)
            add("backend_queue_waiting", proxy.backend_limiter.waiting)
            add("held_statements", proxy.gate.held_statements)
            add("active_holds", len(proxy.gate.snapshot()))
            incoming, outgoing = proxy.byte_totals()
            add("bytes_client_to_backend", incoming)
            add("bytes_backend_to_client", outgoing)
            history = list(proxy.gate.history)
            add("holds_finished", len(history))
            held = [float(str(h["hold_seconds"])) for h in history if h["result"] != "abandoned"]
            add("hold_seconds_max", round(max(held), 6) if held else 0.0)
            add("holds_abandoned", sum(1 for h in history if h["result"] == "abandoned"))
            add("holds_expired", sum(1 for h in history if h["result"] == "expired"))
            add("classifier_cache_hits", proxy.gate.classifier.hits)
            add("routing_active", int(proxy.routing is not None))
        if metrics is not None:
            add("queries_total", metrics.total_queries())
            add("queries_failed", metrics.total_queries(ok=False))
            add("client_connections_total", metrics.client_connections_total)
        router = getattr(app, "router", None)
        if router is not None:
            add("rules_live", len(router.rules.specs))
            add("rules_pending", int(router.pending))
            for (reason, tag), count in sorted(router.rejected.items()):
                add(f"rejections.{reason}.{tag}", count)
            for name, count in router.mirror_counts.items():
                add(f"mirrored_{name}", count)
        service = app.migrations
        if service is not None:
            add("migrations_running_here", len(service.running))
        return rows

    def settings(self) -> list[Row]:
        config = self.app.config
        limits = config.limits
        rows = [{"name": f"limits.{name}", "value": getattr(limits, name)} for name in limits.__dataclass_fields__]
        # Numbers only: operators compare values (WHERE value > 100); the
        # textual settings are in the configuration file.
        for section in ("routing", "backpressure"):
            values = getattr(config, section, None)
            if values is None:
                continue
            for name in values.__dataclass_fields__:
                value = getattr(values, name)
                if name == "priorities":
                    rows.extend({"name": f"{section}.{name}.{k}", "value": v} for k, v in value)
                elif isinstance(value, bool):
                    rows.append({"name": f"{section}.{name}", "value": int(value)})
                elif isinstance(value, int | float):
                    rows.append({"name": f"{section}.{name}", "value": value})
        return rows

    # -- migrations (delegated to the migration service) ---------------------

    def _service(self) -> Any:
        service = self.app.migrations
        if service is None:
            raise ControlError("migrations are not enabled: the sidecar has no service account (a DSN with user)")
        return service

    async def migrations(self) -> list[Row]:
        return list(await self._service().list())

    async def sidecars(self) -> list[Row]:
        return list(await self._service().sidecars())

    async def blockers(self) -> list[Row]:
        """Who holds or waits for the lock of each table being migrated (``proxy.blockers``)."""
        return list(await self._service().blockers())

    def events(self) -> list[Row]:
        """The last events of this sidecar (``proxy.events``), oldest first."""
        from proxy.events import admin_rows

        return admin_rows(self.app.events.tail())

    async def start_migration(self, schema: str, table: str, alter: str, options: dict[str, str] | None = None) -> int:
        return int(await self._service().request(schema, table, alter, options or {}))

    async def throttle(self, migration_id: int, reason: str | None) -> None:
        await self._service().command(migration_id, "throttle", reason)

    async def postpone(self, migration_id: int, on: bool) -> None:
        await self._service().command(migration_id, "postpone", "1" if on else "0")

    async def cut_over(self, migration_id: int) -> None:
        """Lift a postponed cut-over now."""
        await self._service().command(migration_id, "postpone", "0")

    async def cancel(self, migration_id: int) -> None:
        await self._service().command(migration_id, "cancel", None)

    async def set_option(self, migration_id: int, name: str, value: str) -> None:
        await self._service().command(migration_id, f"set:{name}", value)
