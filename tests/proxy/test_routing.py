"""Routing rules (pure) and the router's time-dependent parts (mock clock, scripted probes)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import trio
import trio.testing

from proxy.backends import Endpoint
from proxy.classify import classify_text
from proxy.config import BackpressureConfig, RoutingConfig
from proxy.router import LagEstimator, ReplicaStatus, Router, gtid_contains, parse_gtid
from proxy.routing import (
    NO_DECISION,
    Decision,
    RuleError,
    RuleSet,
    bucket,
    compile_rules,
    digest,
    digest_text,
    inject_hint,
    make_spec,
    session_effect,
)

BACKENDS = {"primary": "primary", "replica1": "replica", "replica2": "replica"}


def rules(*specs: dict[str, object]) -> RuleSet:
    return compile_rules([make_spec(spec) for spec in specs], BACKENDS)


def decide(
    ruleset: RuleSet, sql: str, *, user: str = "app", schema: str | None = "shop",
    attributes: dict[str, str] | None = None,
) -> Decision:
    attributes = attributes or {}
    raw = sql.encode()
    mask = ruleset.session_mask(user, schema, attributes)
    return ruleset.decide(raw, classify_text(sql), schema, mask, attributes)


# --------------------------------------------------------------------------- matching


def test_no_match_is_the_shared_no_decision() -> None:
    ruleset = rules({"id": 1, "kinds": "write", "route": "primary"})
    assert decide(ruleset, "SELECT 1") is NO_DECISION


def test_matchers_user_schema_kind_tables_tags_attributes() -> None:
    ruleset = rules(
        {"id": 1, "user": "report", "route": "replica"},
        {"id": 2, "schema": "shop", "kinds": ["read"], "tables": ["orders"], "route": "replica1"},
        {"id": 3, "tags": {"tidegate": "gray"}, "route": "replica2"},
        {"id": 4, "attributes": {"program_name": "batch*"}, "route": "primary"},
        {"id": 5, "attributes": "program_name=cron", "route": "primary"},
    )
    assert decide(ruleset, "SELECT 1", user="report").route == "replica"
    assert decide(ruleset, "SELECT * FROM orders").route == "replica1"
    assert decide(ruleset, "SELECT * FROM shop.orders", schema=None) is NO_DECISION  # rule 2: schema shop
    assert decide(ruleset, "SELECT * FROM orders", schema="crm") is NO_DECISION
    assert decide(ruleset, "SELECT * FROM crm.orders").route == "replica1"  # 'orders': any schema
    assert decide(ruleset, "/* tidegate:gray */ SELECT * FROM items").route == "replica2"
    assert decide(ruleset, "UPDATE orders SET a = 1 /* tidegate:gray */").route == "replica2"
    assert decide(ruleset, "SELECT 2", attributes={"program_name": "cron"}).route == "primary"
    assert decide(ruleset, "SELECT 2", attributes={"program_name": "web"}) is NO_DECISION


def test_table_patterns_and_qualified_names() -> None:
    ruleset = rules({"id": 1, "tables": ["shop.order*"], "route": "replica"})
    assert decide(ruleset, "SELECT * FROM order_items").route == "replica"
    assert decide(ruleset, "SELECT * FROM crm.orders").route is None
    assert decide(ruleset, "SELECT * FROM orders", schema="crm") is NO_DECISION
    assert decide(ruleset, "SELECT * FROM shop.orders", schema="crm").route == "replica"


def test_digest_and_regex() -> None:
    shape = "SELECT * FROM orders WHERE id = 5"
    ruleset = rules(
        {"id": 1, "digest": digest("select * from orders where id=1"), "comment": "by digest"},
        {"id": 2, "digest": "SELECT name FROM users WHERE id IN (1, 2)", "comment": "by text"},
        {"id": 3, "match": r"\bFROM\s+audit\b", "reject": "audit is write-only"},
    )
    assert decide(ruleset, shape).sql == b"/* by digest */ " + shape.encode()
    assert decide(ruleset, "select name from users where id in (7)").sql is not None
    rejected = decide(ruleset, "select * from audit")
    assert rejected.reject == "audit is write-only" and rejected.rules == (3,)
    assert digest_text("SELECT * FROM t WHERE a = 'x' AND b IN (1,2,3) -- c") == \
        "select * from t where a = ? and b in ( ? )"


def test_actions_accumulate_first_route_wins_last_stops() -> None:
    ruleset = rules(
        {"id": 10, "kinds": "read", "hint": "MAX_EXECUTION_TIME(500)"},
        {"id": 20, "tables": "orders", "route": "replica1", "comment": "orders"},
        {"id": 30, "route": "replica2", "mirror": "replica2", "last": True},
        {"id": 40, "route": "primary", "comment": "never"},
    )
    decision = decide(ruleset, "SELECT * FROM orders WHERE id = 1")
    assert decision.route == "replica1" and decision.route_rule == 20
    assert decision.mirror == "replica2"
    assert decision.rules == (10, 20, 30)
    assert decision.sql == b"/* orders */ SELECT /*+ MAX_EXECUTION_TIME(500) */ * FROM orders WHERE id = 1"


def test_rewrite_with_groups() -> None:
    ruleset = rules({"id": 1, "match": r"^SELECT (\w+) FROM big_table", "rewrite": r"SELECT \1 FROM big_table_v2"})
    assert decide(ruleset, "SELECT a FROM big_table LIMIT 1").sql == b"SELECT a FROM big_table_v2 LIMIT 1"


def test_hint_injection_after_leading_comments_and_into_existing_hint() -> None:
    assert inject_hint("/* a */ -- b\n select 1", "H") == "/* a */ -- b\n select /*+ H */ 1"
    assert inject_hint("SELECT /*+ A */ 1", "B") == "SELECT /*+ B A */ 1"
    assert inject_hint("SHOW TABLES", "H") == "SHOW TABLES"
    assert inject_hint("/*!40101 SELECT 1 */", "H") == "/*!40101 SELECT 1 */"


def test_non_utf8_statements_survive_a_rewrite_byte_for_byte() -> None:
    ruleset = rules({"id": 1, "comment": "c"})
    raw = b"SELECT '\xff\xfe' FROM t"
    decision = ruleset.decide(raw, classify_text(raw.decode("utf-8", "replace")), None,
                              ruleset.session_mask("u", None, {}), {})
    assert decision.sql == b"/* c */ " + raw


# --------------------------------------------------------------------------- percentages


def test_percentage_is_stable_per_key_and_within_a_few_percent() -> None:
    ruleset = rules({"id": 1, "tags": {"tidegate": "gray"}, "percent": 10, "key": "uid", "route": "replica1"})
    chosen = 0
    for uid in range(10_000):
        sql = f"/* tidegate:gray uid={uid} */ SELECT * FROM orders WHERE user_id = {uid}"
        first = decide(ruleset, sql).route
        assert decide(ruleset, sql.replace("SELECT *", "SELECT id")).route == first  # the key decides
        chosen += first == "replica1"
    assert 900 <= chosen <= 1100, chosen


def test_raising_the_percentage_only_adds_keys() -> None:
    """Ramping a gray release: the 5% slice stays inside the 10% slice."""
    keys = [str(uid) for uid in range(10_000)]
    for low, high in ((5, 10), (10, 25), (25, 50), (50, 100)):
        inside_low = {key for key in keys if bucket(key) < low * 100}
        inside_high = {key for key in keys if bucket(key) < high * 100}
        assert inside_low <= inside_high
        assert abs(len(inside_high) - high * 100) <= 150
    assert bucket("42") == bucket("42")  # same in every process: blake2b, not hash()
    assert bucket("42", "exp-1") != bucket("42", "exp-2") or bucket("43", "exp-1") != bucket("43", "exp-2")


def test_percentage_key_from_connection_attribute_and_missing_key() -> None:
    ruleset = rules({"id": 1, "percent": 100, "key": "tenant", "route": "replica1"},
                    {"id": 2, "percent": 0, "key": "tenant", "route": "replica2"})
    assert decide(ruleset, "SELECT 1", attributes={"tenant": "acme"}).route == "replica1"
    assert decide(ruleset, "SELECT 1") is NO_DECISION  # no key: not in the slice


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        ({"id": 1, "match": "(unclosed", "route": "primary"}, "match", "invalid regular expression"),
        ({"id": 1, "route": "nowhere"}, "route", "unknown backend 'nowhere'"),
        ({"id": 1, "mirror": "primary"}, "mirror", "run statements twice"),
        ({"id": 1, "mirror": "nowhere"}, "mirror", "unknown backend"),
        ({"id": 1, "rewrite": "x"}, "rewrite", "needs match"),
        ({"id": 1, "match": "(a)", "rewrite": r"\2"}, "rewrite", "invalid replacement"),
        ({"id": 1, "kinds": "reads", "route": "primary"}, "kinds", "unknown kind"),
        ({"id": 1, "percent": 101, "route": "primary"}, "percent", "0..100"),
        ({"id": 1, "hint": "x */ DROP TABLE t; /*"}, "hint", "must not contain"),
        ({"id": 1, "user": "app"}, "route", "does nothing"),
        ({"id": 0, "route": "primary"}, "id", "integer"),
        ({"id": 1, "rout": "primary"}, "rout", "did you mean 'route'"),
    ],
)
def test_bad_rules_are_refused_with_the_field_named(spec: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rules([make_spec(spec)], BACKENDS)
    assert info.value.field == field
    assert words in str(info.value)


def test_inactive_rules_are_checked_but_not_used() -> None:
    ruleset = rules({"id": 1, "active": False, "route": "replica1"})
    assert len(ruleset) == 0 and len(ruleset.specs) == 1
    assert decide(ruleset, "SELECT 1") is NO_DECISION
    with pytest.raises(RuleError):
        rules({"id": 1, "active": False, "match": "(", "route": "primary"})


# --------------------------------------------------------------------------- session effects


@pytest.mark.parametrize(
    ("sql", "pins"),
    [
        ("SET NAMES utf8mb4", False),
        ("SET NAMES 'latin1' COLLATE 'latin1_bin'", False),
        ("SET CHARACTER SET utf8mb4", False),
        ("SET NAMES utf8mb4, sql_mode = ''", True),
        ("SET autocommit = 1", False),
        ("SET @a = 1, @b = 'x'", False),
        ("USE shop", False),
        ("BEGIN", False),
        ("SET sql_mode = ''", True),
        ("SET SESSION time_zone = '+00:00'", True),
        ("SET @a = (SELECT 1)", True),
        ("CREATE TEMPORARY TABLE t (a INT)", True),
        ("SELECT GET_LOCK('x', 1)", True),
        ("LOCK TABLES t WRITE", True),
        ("PREPARE s FROM 'SELECT 1'", True),
        ("CALL proc()", True),
        ("SELECT 1; SELECT 2", True),
        ("INSERT INTO t VALUES (1)", False),
    ],
)
def test_session_effects(sql: str, pins: bool) -> None:
    assert (session_effect(sql, classify_text(sql)) is not None) is pins


# --------------------------------------------------------------------------- lag


def test_gtid_positions() -> None:
    assert parse_gtid("0-1-100,1-2-5") == {0: 100, 1: 5}
    assert parse_gtid("") == {}
    assert gtid_contains({0: 100, 1: 5}, {0: 99})
    assert not gtid_contains({0: 100}, {0: 100, 1: 1})
    with pytest.raises(ValueError):
        parse_gtid("3E11FA47-71CA-11E1-9E33-C80AA9429562:23")


def test_lag_estimator_counts_from_when_the_primary_got_ahead() -> None:
    estimator = LagEstimator()
    assert estimator.observe(10.0, {0: 5}, {0: 5}) == 0.0
    assert estimator.observe(11.0, {0: 6}, {0: 5}) == 0.0  # the primary moved just now
    assert estimator.observe(12.5, {0: 8}, {0: 5}) == 1.5  # still missing 6, seen at 11.0
    assert estimator.observe(13.0, {0: 9}, {0: 6}) == 0.5  # 6 applied; 8 was first seen at 12.5
    assert estimator.observe(14.0, {0: 9}, {0: 9}) == 0.0


class ScriptedProber:
    """Positions as a test sets them."""

    def __init__(self) -> None:
        self.primary = "0-1-10"
        self.replicas: dict[str, ReplicaStatus] = {}

    async def primary_position(self) -> str | None:
        await trio.lowlevel.checkpoint()
        return self.primary

    async def replica_status(self, endpoint: Endpoint) -> ReplicaStatus:
        await trio.lowlevel.checkpoint()
        return self.replicas[endpoint.name]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def running(position: str) -> ReplicaStatus:
    return ReplicaStatus(True, True, 0.0, position)


def make_router(prober: ScriptedProber, *, migration_lags: Iterable[tuple[str, float]] | None = None,
                **backpressure: object) -> Router:
    endpoints = [Endpoint("primary", "h", 1), Endpoint("replica1", "h", 2, "replica")]
    lags = list(migration_lags) if migration_lags is not None else None
    return Router(
        RoutingConfig(read_write_split=True, max_replica_lag=1.0, lag_probe_interval=0.25),
        BackpressureConfig(**backpressure),  # type: ignore[arg-type]
        endpoints,
        prober=prober,
        migration_lags=(lambda: lags) if lags is not None else None,
    )


async def test_replica_leaves_and_returns_with_lag(autojump_clock: trio.testing.MockClock) -> None:
    prober = ScriptedProber()
    prober.replicas["replica1"] = running("0-1-10")
    router = make_router(prober)
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        assert router.replica_for(None, None) == "replica1"
        prober.primary = "0-1-11"  # a write the replica does not apply
        await trio.sleep(0.6)
        assert router.replicas["replica1"].state == "up"  # 0.5 s behind: within 1 s
        await trio.sleep(1.0)
        health = router.replicas["replica1"]
        assert health.state == "lagging" and health.lag is not None and health.lag > 1.0
        assert router.replica_for(None, None) is None
        prober.replicas["replica1"] = running("0-1-11")
        await trio.sleep(0.3)
        assert router.replica_for(None, "replica1") == "replica1"
        prober.replicas["replica1"] = ReplicaStatus(True, False, None, "0-1-11", None)
        await trio.sleep(0.3)
        assert router.replicas["replica1"].state == "stopped"
        assert router.replica_for(None, None) is None
        nursery.cancel_scope.cancel()


async def test_backpressure_waits_then_rejects_then_admits(autojump_clock: trio.testing.MockClock) -> None:
    prober = ScriptedProber()
    prober.replicas["replica1"] = running("0-1-10")
    router = make_router(prober, max_replica_lag=1.0, max_wait=2.0, retry_after=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        assert await router.admit_write(None, "default") is None
        prober.primary = "0-1-11"
        await trio.sleep(1.6)
        assert router.pressure_possible
        # batch sheds at half the limit, interactive only at twice it
        assert router.pressure(None, "batch") is not None
        assert router.pressure(None, "interactive") is None
        started = trio.current_time()
        rejection = await router.admit_write(None, "default")
        assert rejection is not None and trio.current_time() - started == pytest.approx(2.0)
        assert rejection.message().startswith("tidegate: too many requests: replica lag ")
        assert "> 1.0 s; retry after 500 ms" in rejection.message()
        assert router.rejected == {("replica_lag", "default"): 1}

        async def recover() -> None:
            await trio.sleep(0.5)
            prober.replicas["replica1"] = running("0-1-11")

        nursery.start_soon(recover)
        started = trio.current_time()
        assert await router.admit_write(None, "default") is None  # waited, then admitted
        assert 0.5 <= trio.current_time() - started <= 1.0
        nursery.cancel_scope.cancel()


async def test_backpressure_only_for_protected_and_migrating_tables(autojump_clock: trio.testing.MockClock) -> None:
    prober = ScriptedProber()
    prober.replicas["replica1"] = running("0-1-10")
    router = make_router(
        prober, migration_lags=[("shop.orders", 9.0)], max_migration_lag=5.0, max_wait=0.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        rejection = await router.admit_write(frozenset({"shop.orders"}), "default")
        assert rejection is not None and rejection.reason == "migration_lag"
        assert "migration lag on shop.orders 9.0 s > 5.0 s" in rejection.message()
        assert await router.admit_write(frozenset({"shop.items"}), "default") is None
        assert await router.admit_write(None, "default") is not None  # unknown tables: maybe orders
        nursery.cancel_scope.cancel()


def test_staged_rules_apply_atomically() -> None:
    router = make_router(ScriptedProber())
    router.attach(type("P", (), {"routing": None})())
    router.stage_insert({"id": 10, "kinds": "read", "route": "replica"})
    assert router.pending and router.rules.empty
    assert [row["state"] for row in router.rule_rows()] == ["staged"]
    router.apply()
    assert not router.pending and len(router.rules) == 1
    router.rules.hits[10] = 7
    with pytest.raises(RuleError):
        router.stage_insert({"id": 20, "match": "(", "route": "primary"})
    with pytest.raises(RuleError):
        router.stage_update(10, {"route": "nowhere"})
    assert not router.pending  # refused edits leave nothing staged
    router.stage_insert({"id": 20, "kinds": "write", "comment": "w"})
    router.stage_update(10, {"percent": 50})
    router.stage_delete(20)
    router.apply()
    assert [spec.id for spec in router.rules.specs] == [10]
    assert router.rules.hits[10] == 0  # rule 10 changed: a fresh counter
    router.stage_insert({"id": 30, "kinds": "write", "comment": "w"})
    router.apply()
    assert router.rules.hits[10] == 0 and router.rules.hits[30] == 0
    router.stage_delete(30)
    router.discard()
    assert not router.pending


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("sql", "shape"),
    [
        (b"SELECT c FROM sbtest1 WHERE id=1234", b"SELECT c FROM sbtest1 WHERE id=?"),
        (b"/* uid=7 */ SELECT 'a''b', \"x\" FROM `2019`.t1 WHERE x IN (1, 2.5e3)",
         b"/* uid=7 */ SELECT ?, ? FROM `2019`.t1 WHERE x IN (?, ?)"),
        (b"SELECT * FROM 2019_orders LIMIT 10", b"SELECT * FROM 2019_orders LIMIT ?"),
        (b"SELECT @v1, t2.c3 FROM t2", b"SELECT @v1, t2.c3 FROM t2"),
        (b"SELECT 'unterminated", b"SELECT 'unterminated"),
    ],
)
def test_shapes_keep_comments_and_identifiers(sql: bytes, shape: bytes) -> None:
    from proxy.classify import shape_of

    assert shape_of(sql) == shape


def test_statements_differing_in_literals_share_facts_and_rule_work() -> None:
    from proxy.classify import Classifier

    classifier = Classifier()
    first = classifier.classify(b"SELECT * FROM orders WHERE id = 1 /* tidegate:gray uid=5 */")
    second = classifier.classify(b"SELECT * FROM orders WHERE id = 2 /* tidegate:gray uid=5 */")
    assert first is second and first.tags == {"tidegate": "gray", "uid": "5"}
    assert classifier.classify(b"SELECT * FROM orders WHERE id = 3 /* uid=6 */") is not first
    ruleset = rules({"id": 1, "match": r"id = 2\b", "route": "replica1"}, {"id": 2, "tables": "orders", "comment": "o"})
    mask = ruleset.session_mask("app", "shop", {})
    one = ruleset.decide(b"SELECT * FROM orders WHERE id = 1", first, "shop", mask, {})
    two = ruleset.decide(b"SELECT * FROM orders WHERE id = 2", second, "shop", mask, {})
    assert one.route is None and one.sql == b"/* o */ SELECT * FROM orders WHERE id = 1"
    assert two.route == "replica1" and two.sql == b"/* o */ SELECT * FROM orders WHERE id = 2"  # regex: raw text
