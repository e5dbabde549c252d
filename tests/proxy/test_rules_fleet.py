"""Fleet-wide routing rules: APPLY RULES TO FLEET on one sidecar, every sidecar follows.

Each real test runs two or three sidecars (``start_proxy``) sharing a state
schema of the test's own, in front of the test primary.  That a sidecar runs
a published set is checked by what reaches the server: a ``comment`` rule's
text read back from the primary's general log, or a ``reject`` rule's error
to the client, not only by the admin tables.  The pure parts (documents,
version compare, states, the router's bookkeeping) have unit tests without a
database at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pymysql
import pytest
from pymysql.connections import Connection

from proxy import sandbox
from proxy.admin.statements import RulesVerb, parse_rules_verb
from proxy.admin.tables import AdminError
from proxy.backends import Endpoint
from proxy.classify import Classifier
from proxy.config import BackpressureConfig, RoutingConfig
from proxy.metrics import FLEET_RULE_STATES, Metrics
from proxy.router import FLEET_STATES, Router, fleet_rules_state, fleet_version_changed
from proxy.routing import RuleError, RuleSpec, decode_rules, encode_rules, make_spec
from tests.proxy.conftest import RunningProxy, start_proxy
from tests.proxy.conftest import eventually as shared_eventually

T = TypeVar("T")

#: a sidecar polls the published version once a heartbeat (1 s); generous for a loaded machine
CONVERGE = 15.0


# ------------------------------------------------------------------------ helpers


def state_schema(tmp_path: Path) -> str:
    """A state schema of the test's own: its fleet is this test's sidecars alone."""
    return "_tg_rules_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)[-40:]


def eventually(check: Callable[[], T | None], what: str, timeout: float = CONVERGE) -> T:
    return shared_eventually(check, what, timeout, interval=0.1)


def admin(running: RunningProxy) -> Connection[Any]:
    assert running.app.admin_listening is not None
    host, port = running.app.admin_listening
    return pymysql.connect(host=host, port=port, user="admin", password="", connect_timeout=5, autocommit=True)


def run(connection: Connection[Any], sql: str) -> list[dict[str, Any]]:
    with connection.cursor(pymysql.cursors.DictCursor) as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def info(connection: Connection[Any]) -> str:
    return bytes(connection._result.message or b"").decode("utf-8", "replace")


def error_of(connection: Connection[Any], sql: str) -> tuple[int, str]:
    with pytest.raises(pymysql.MySQLError) as raised:
        run(connection, sql)
    return int(raised.value.args[0]), str(raised.value.args[1])


def client(running: RunningProxy, database: str) -> Connection[Any]:
    return pymysql.connect(host=running.host, port=running.port, user="app", password="app-secret",
                           database=database, autocommit=True, connect_timeout=5)


def general_log(primary: sandbox.Instance, like: str) -> list[str]:
    rows = primary.execute(
        f"SELECT CONVERT(argument USING utf8mb4) FROM mysql.general_log WHERE argument LIKE '{like}' "
        "AND argument NOT LIKE '%mysql.general_log%'"
    )
    return [str(row[0]) for row in rows]


def marked(running: RunningProxy, primary: sandbox.Instance, database: str, probe: str) -> list[str]:
    """Run ``probe`` through ``running``; the primary's log lines of it (with any injected comment)."""
    connection = client(running, database)
    try:
        run(connection, probe)
    finally:
        connection.close()
    return general_log(primary, f"%{probe}%")


def rejected(running: RunningProxy, database: str, sql: str) -> str | None:
    """The reject message ``running`` answers ``sql`` with, None if it runs."""
    connection = client(running, database)
    try:
        run(connection, sql)
        return None
    except pymysql.MySQLError as error:
        assert error.args[0] == 1148, error.args
        return str(error.args[1])
    finally:
        connection.close()


def fleet_state(running: RunningProxy) -> dict[str, Any]:
    status = running.call(running.app.status)
    return dict(status["routing"]["fleet_rules"])


def exported(running: RunningProxy) -> str:
    metrics = running.app.metrics
    assert metrics is not None
    return str(running.call(lambda: metrics.render()[0]).decode())


def metric(running: RunningProxy, name: str) -> float:
    text = exported(running)
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if name == "tidegate_fleet_rules_state" and not line.endswith(" 1.0"):
                continue
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def state_metric(running: RunningProxy) -> str:
    text = exported(running)
    [state] = [line.split('"')[1] for line in text.splitlines()
               if line.startswith("tidegate_fleet_rules_state{") and line.endswith(" 1.0")]
    return state


@pytest.fixture
def fleet(primary: sandbox.Instance, app_user: tuple[str, str], tmp_path: Path) -> Iterator[Callable[..., RunningProxy]]:
    """Start sidecars sharing this test's state schema; all stopped (and the schema dropped) after."""
    schema = state_schema(tmp_path)
    with ExitStack() as stack:
        stack.callback(primary.execute, f"DROP DATABASE IF EXISTS `{schema}`")

        def start(*args: str) -> RunningProxy:
            running = start_proxy(["--backend", primary.dsn(), "--state-schema", schema, *args],
                                  metrics=Metrics(process_metrics=False))
            stack.callback(running.stop)
            eventually(lambda: running.app.fleet_rules is not None and running.app.fleet_rules.fleet.ready.is_set(),
                       "registered in the state schema")
            return running

        yield start


@pytest.fixture
def logged(primary: sandbox.Instance) -> Iterator[None]:
    primary.execute("SET GLOBAL log_output = 'TABLE'", "TRUNCATE mysql.general_log", "SET GLOBAL general_log = 1")
    try:
        yield
    finally:
        primary.execute("SET GLOBAL general_log = 0")


# ------------------------------------------------------------------------ real sidecars


def test_published_rules_reach_every_sidecar(
    fleet: Callable[..., RunningProxy], primary: sandbox.Instance, database: str, logged: None, tmp_path: Path
) -> None:
    primary.execute(f"CREATE TABLE `{database}`.fleet_t (id INT PRIMARY KEY)", f"INSERT INTO `{database}`.fleet_t VALUES (1)")
    own = tmp_path / "own.toml"
    own.write_text('[[rules]]\nid = 1\ntables = ["fleet_t"]\ncomment = "own-rules"\n')
    publisher, follower = fleet(), fleet()
    ignoring = fleet("--no-fleet-rules", "--config", str(own))
    control = admin(publisher)
    try:
        assert fleet_state(follower)["state"] == "none"
        run(control, "INSERT INTO rules (id, tables, comment) VALUES (10, 'fleet_t', 'fleet-marker-v1')")
        run(control, "APPLY RULES TO FLEET 'first ramp'")
        assert "fleet rule version 1 published: 1 rules (1 active), live here now" in info(control)
        # the follower sends the statement with the published comment; the publisher at once
        probe = "SELECT id FROM fleet_t WHERE id > 0"
        seen = eventually(lambda: [line for line in marked(follower, primary, database, probe)
                                   if line.startswith("/* fleet-marker-v1 */")], "the comment from the follower")
        assert seen[0] == f"/* fleet-marker-v1 */ {probe}"
        # the ignoring sidecar keeps its own (configuration-file) rules
        assert marked(ignoring, primary, database, probe + " AND 1 = 1") == [f"/* own-rules */ {probe} AND 1 = 1"]

        def reported() -> list[dict[str, Any]] | None:
            rows = run(control, "SELECT * FROM sidecar_rules ORDER BY sidecar")
            return rows if sorted(r["state"] for r in rows) == ["converged", "converged", "ignoring"] else None

        rows = eventually(reported, "every sidecar reported")
        by_id = {row["sidecar"]: row for row in rows}
        ids = {name: running.app.fleet_rules.fleet.id for name, running in
               (("publisher", publisher), ("follower", follower), ("ignoring", ignoring))}
        assert by_id[ids["follower"]]["version"] == 1 and by_id[ids["follower"]]["converged"] == 1
        assert by_id[ids["publisher"]]["this_sidecar"] == 1 and by_id[ids["publisher"]]["source"] == "fleet"
        assert by_id[ids["ignoring"]]["state"] == "ignoring" and by_id[ids["ignoring"]]["converged"] == 0
        assert by_id[ids["ignoring"]]["version"] is None and by_id[ids["ignoring"]]["fleet_version"] == 1
        [version] = run(admin(follower), "SELECT version, published_by, note, rules, latest, live_here "
                                         "FROM fleet_rule_versions")
        assert version == {"version": 1, "published_by": ids["publisher"], "note": "first ramp", "rules": 1,
                           "latest": 1, "live_here": 1}
        [rule] = run(admin(follower), "SELECT version, id, tables, comment FROM fleet_rules")
        assert rule == {"version": 1, "id": 10, "tables": "fleet_t", "comment": "fleet-marker-v1"}
        # the follower's own rules table shows the set live, nothing pending
        assert run(admin(follower), "SELECT state, id, pending FROM rules") == [
            {"state": "live", "id": 10, "pending": None}]
        assert metric(follower, "tidegate_fleet_rules_version") == 1.0
        assert metric(follower, "tidegate_fleet_rules_latest_version") == 1.0
        assert state_metric(follower) == "converged" and state_metric(ignoring) == "ignoring"

        # a second version from the follower's admin port: a reject rule, the comment rule changed
        other = admin(follower)
        run(other, "UPDATE rules SET comment = 'fleet-marker-v2' WHERE id = 10")
        run(other, "INSERT INTO rules (id, `match`, reject) VALUES (5, 'DELETE\\\\s+FROM\\\\s+fleet_t', "
                   "'fleet says no deletes')")
        run(other, "APPLY RULES TO FLEET")
        assert "fleet rule version 2 published" in info(other)
        message = eventually(lambda: rejected(publisher, database, "DELETE FROM fleet_t WHERE id = 99"),
                             "the reject on the publisher")
        assert message == "tidegate: fleet says no deletes (rule 5)"
        assert rejected(ignoring, database, "DELETE FROM fleet_t WHERE id = 99") is None
        assert rejected(follower, database, "DELETE FROM fleet_t") == message
        assert primary.execute(f"SELECT COUNT(*) FROM `{database}`.fleet_t")[0][0] == 1
        other.close()
    finally:
        control.close()


def test_a_bad_set_is_refused_at_publish_and_nothing_changes(
    fleet: Callable[..., RunningProxy], database: str, primary: sandbox.Instance
) -> None:
    publisher, follower = fleet(), fleet()
    control = admin(publisher)
    try:
        assert error_of(control, "LOAD RULES FROM FLEET")[0] == 1105  # nothing published yet
        run(control, "INSERT INTO rules (id, `match`, reject) VALUES (3, 'fleet_bad_probe', 'v1 rejects')")
        run(control, "APPLY RULES TO FLEET")
        eventually(lambda: rejected(follower, database, "SELECT 'fleet_bad_probe'"), "version 1 on the follower")
        # staging checks each rule; publishing checks the whole set again, exactly like APPLY RULES
        assert publisher.app.router is not None
        publisher.call(publisher.app.router.staged.__setitem__, 4,
                       RuleSpec(id=4, match="(unclosed", route="primary"))
        code, message = error_of(control, "APPLY RULES TO FLEET 'broken'")
        assert code == 1231
        assert message.startswith("rules not published, nothing changed: rule 4: match: ")
        assert [r["version"] for r in run(control, "SELECT version FROM fleet_rule_versions")] == [1]
        primary_versions = primary.execute(
            f"SELECT COUNT(*) FROM `{publisher.app.config.state_schema}`.routing_rules")[0][0]
        assert primary_versions == 1
        for running in (publisher, follower):
            assert fleet_state(running)["live_version"] == 1
            assert rejected(running, database, "SELECT 'fleet_bad_probe'") == "tidegate: v1 rejects (rule 3)"
        assert [r["id"] for r in run(control, "SELECT id FROM rules WHERE state = 'live'")] == [3]
        # bad syntax says how it is spelt
        code, message = error_of(control, "APPLY RULES TO FLEET now")
        assert code == 1064 and "APPLY RULES TO FLEET ['<note>']" in message
        assert error_of(control, "LOAD RULES FROM FLEET 'x'")[0] == 1064
    finally:
        control.close()


def test_a_sidecar_that_cannot_load_a_set_keeps_its_rules_and_says_why(
    fleet: Callable[..., RunningProxy], primary: sandbox.Instance, replica: sandbox.Instance, database: str,
) -> None:
    sandbox.wait_replica_caught_up(primary, replica)
    with_replica = fleet("--backend", f"{replica.dsn()}?role=replica&name=replica1")
    primary_only = fleet()
    control = admin(with_replica)
    try:
        run(control, "INSERT INTO rules (id, `match`, reject) VALUES (3, 'fleet_load_probe', 'v1 rejects')")
        run(control, "APPLY RULES TO FLEET")
        eventually(lambda: rejected(primary_only, database, "SELECT 'fleet_load_probe'"), "version 1 everywhere")
        eventually(lambda: len(run(control, "SELECT sidecar FROM sidecar_rules WHERE converged = 1")) == 2,
                   "both report version 1")
        # version 2 routes to a backend only the first sidecar has
        run(control, "UPDATE rules SET reject = 'v2 rejects' WHERE id = 3")
        run(control, "INSERT INTO rules (id, kinds, route) VALUES (8, 'read', 'replica1')")
        run(control, "APPLY RULES TO FLEET")
        with control.cursor() as cursor:
            cursor.execute("SHOW WARNINGS")
            warnings = [row[2] for row in cursor.fetchall()]
        primary_only_id = primary_only.app.fleet_rules.fleet.id
        assert any(primary_only_id in text and "unknown backend 'replica1'" in text for text in warnings), warnings
        assert rejected(with_replica, database, "SELECT 'fleet_load_probe'") == "tidegate: v2 rejects (rule 3)"

        def refusal() -> dict[str, Any] | None:
            row = next(r for r in run(control, "SELECT * FROM sidecar_rules") if r["sidecar"] == primary_only_id)
            return row if row["state"] == "refused" else None

        row = eventually(refusal, "the refusal reported")
        assert row["version"] == 1 and row["fleet_version"] == 2 and row["converged"] == 0
        assert "cannot load fleet rule version 2" in row["detail"] and "unknown backend 'replica1'" in row["detail"]
        status = fleet_state(primary_only)
        assert status["state"] == "refused" and status["live_version"] == 1 and status["refused_version"] == 2
        assert state_metric(primary_only) == "refused" and metric(primary_only, "tidegate_fleet_rules_version") == 1
        # still on version 1, by behaviour; and LOAD RULES FROM FLEET says why it cannot
        assert rejected(primary_only, database, "SELECT 'fleet_load_probe'") == "tidegate: v1 rejects (rule 3)"
        code, message = error_of(admin(primary_only), "LOAD RULES FROM FLEET")
        assert code == 1231 and "unknown backend 'replica1'" in message and "keeps its live rules" in message
        # a version it can load brings it back
        run(control, "DELETE FROM rules WHERE id = 8")
        run(control, "APPLY RULES TO FLEET")
        eventually(lambda: fleet_state(primary_only)["state"] == "converged", "converged on version 3")
        assert rejected(primary_only, database, "SELECT 'fleet_load_probe'") == "tidegate: v2 rejects (rule 3)"
    finally:
        control.close()


def test_local_apply_diverges_until_the_fleet_set_is_loaded_again(
    fleet: Callable[..., RunningProxy], database: str,
) -> None:
    publisher = fleet()
    control = admin(publisher)
    try:
        run(control, "INSERT INTO rules (id, `match`, reject) VALUES (3, 'fleet_local_probe', 'fleet rejects')")
        run(control, "APPLY RULES TO FLEET")
        # a sidecar started after the publish runs the fleet's set, not its (empty) configuration rules
        late = fleet()
        eventually(lambda: rejected(late, database, "SELECT 'fleet_local_probe'"), "the late sidecar loads version 1")
        local = admin(late)
        run(local, "UPDATE rules SET reject = 'local rejects' WHERE id = 3")
        run(local, "APPLY RULES")
        assert "on this sidecar only: it now diverges from fleet rule version 1" in info(local)
        assert rejected(late, database, "SELECT 'fleet_local_probe'") == "tidegate: local rejects (rule 3)"
        status = fleet_state(late)
        assert status["state"] == "diverged" and status["diverged_from"] == 1 and status["live_version"] is None
        late_id = late.app.fleet_rules.fleet.id

        def late_row() -> dict[str, Any]:
            return next(r for r in run(control, "SELECT * FROM sidecar_rules") if r["sidecar"] == late_id)

        row = eventually(lambda: late_row() if late_row()["state"] == "diverged" else None, "divergence reported")
        assert row["source"] == "local" and row["converged"] == 0 and "local APPLY RULES" in row["detail"]
        assert metric(late, "tidegate_fleet_rules_version") == 0 and state_metric(late) == "diverged"
        # the fleet's version is unchanged: the local rules stay (polls do not undo an operator)
        time.sleep(2.5)
        assert rejected(late, database, "SELECT 'fleet_local_probe'") == "tidegate: local rejects (rule 3)"
        run(local, "LOAD RULES FROM FLEET")
        assert "fleet rule version 1 live here" in info(local)
        assert rejected(late, database, "SELECT 'fleet_local_probe'") == "tidegate: fleet rejects (rule 3)"
        assert fleet_state(late)["state"] == "converged"
        eventually(lambda: late_row()["converged"] == 1, "convergence reported")
        local.close()
    finally:
        control.close()


def test_fleet_tables_without_a_state_schema(primary: sandbox.Instance, app_user: tuple[str, str]) -> None:
    running = start_proxy(["--backend", primary.dsn(), "--no-migrations-enabled"])
    try:
        control = admin(running)
        for sql in ("SELECT * FROM sidecar_rules", "APPLY RULES TO FLEET", "LOAD RULES FROM FLEET"):
            code, message = error_of(control, sql)
            assert code == 1105 and "fleet rules need the state schema" in message, sql
        run(control, "INSERT INTO rules (id, `match`, reject) VALUES (3, 'x', 'y')")
        run(control, "APPLY RULES")
        assert info(control).endswith("1 rules live (1 active)")  # no fleet: nothing to diverge from
        assert fleet_state(running)["state"] == "off"
        control.close()
    finally:
        running.stop()


# ------------------------------------------------------------------------ pure parts


def test_documents_round_trip_and_write_only_what_differs() -> None:
    specs = [
        make_spec({"id": 20, "tags": {"tidegate": "gray"}, "percent": 10, "key": "uid", "route": "replica"}),
        make_spec({"id": 5, "match": "^DELETE", "reject": "no", "active": False, "kinds": ["write"]}),
    ]
    text = encode_rules(specs)
    assert text == ('{"format":1,"rules":[{"active":false,"id":5,"kinds":["write"],"match":"^DELETE","reject":"no"},'
                    '{"id":20,"percent":10.0,"route":"replica","tags":{"tidegate":"gray"}}]}')
    assert decode_rules(text) == (specs[1], specs[0])
    assert decode_rules(encode_rules([])) == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[]", 'expected {"format": 1'),
        ('{"format": 2, "rules": []}', "format 2 is not one this sidecar reads"),
        ('{"format": 1, "rules": [1]}', "expected a rule object"),
        ('{"format": 1, "rules": [{"id": 1, "rout": "primary"}]}', "unknown setting (did you mean 'route'?)"),
        ('{"format": 1, "rules": [{"id": 0}]}', "id: required"),
    ],
)
def test_bad_documents_are_refused_whole(text: str, problem: str) -> None:
    with pytest.raises(RuleError) as raised:
        decode_rules(text)
    assert problem in str(raised.value)


def test_version_changes_and_states() -> None:
    assert fleet_version_changed(3, None) and fleet_version_changed(3, 2)
    assert fleet_version_changed(1, 7)  # the state schema was created again: its newest set wins
    assert not fleet_version_changed(3, 3) and not fleet_version_changed(None, 3)

    def state(**overrides: Any) -> str:
        values: dict[str, Any] = {"following": True, "source": "fleet", "live_version": 4, "latest": 4, "refused": None}
        values.update(overrides)
        return fleet_rules_state(**values)

    assert state() == "converged"
    assert state(following=None) == "off" and state(following=False) == "ignoring"
    assert state(latest=None, source="config", live_version=None) == "none"
    assert state(latest=5) == "behind" and state(source="config", live_version=None) == "behind"
    assert state(latest=5, refused=5) == "refused" and state(latest=6, refused=5) == "behind"
    assert state(source="local", live_version=None) == "diverged"
    assert state(source="local", live_version=None, refused=4) == "refused"
    assert FLEET_STATES == FLEET_RULE_STATES


def test_fleet_verbs_parse() -> None:
    assert parse_rules_verb("apply rules to fleet") == RulesVerb("publish")
    assert parse_rules_verb("APPLY RULES TO FLEET 'ramp to 10%' ;") == RulesVerb("publish", "ramp to 10%")
    assert parse_rules_verb("APPLY  RULES  TO  FLEET \"it's\"") == RulesVerb("publish", "it's")
    assert parse_rules_verb("LOAD RULES FROM FLEET;") == RulesVerb("load_fleet")
    assert parse_rules_verb("APPLY RULES") == RulesVerb("apply")
    assert parse_rules_verb("APPLY RULES TO FLEETS") is None
    for bad in ("APPLY RULES TO FLEET now", "LOAD RULES FROM FLEET 'x'", "APPLY RULES TO FLEET 'a' 'b'"):
        with pytest.raises(AdminError) as raised:
            parse_rules_verb(bad)
        assert raised.value.code == 1064


def _router(*names: str) -> Router:
    endpoints = [Endpoint("primary", "127.0.0.1", 1, "primary", None, None),
                 *(Endpoint(name, "127.0.0.1", 2, "replica", None, None) for name in names)]
    return Router(RoutingConfig(), BackpressureConfig(), endpoints, classifier=Classifier())


def test_router_loads_a_fleet_set_keeping_hits_and_staged_edits() -> None:
    router = _router("replica1")
    router.fleet_following = True
    one = make_spec({"id": 1, "match": "a", "route": "primary"})
    two = make_spec({"id": 2, "match": "b", "comment": "x"})
    router.apply_fleet([one, two], 1)
    router.rules.hits.update({1: 5, 2: 7})
    assert router.fleet_state == "converged" and router.fleet_rules_version == 1 and not router.pending
    # an operator is editing rule 1 on this sidecar when version 2 (rule 2 changed) arrives
    router.stage_update(1, {"route": "replica1"})
    changed_two = make_spec({"id": 2, "match": "b", "comment": "y"})
    router.apply_fleet([one, changed_two], 2)
    assert router.rules.hits == {1: 5, 2: 0}  # unchanged rule keeps its counter
    assert router.staged[1].route == "replica1" and router.staged[2] == changed_two and router.pending
    # a set this sidecar cannot load changes nothing but the refusal
    live = router.rules
    with pytest.raises(RuleError):
        router.apply_fleet([make_spec({"id": 3, "match": "c", "route": "replica9"})], 3)
    router.refuse_fleet(3, "unknown backend 'replica9'")
    router.fleet_latest = 3
    assert router.rules is live and router.fleet_state == "refused" and router.fleet_rules_version == 2
    assert router.fleet_summary()["refused_because"] == "unknown backend 'replica9'"
    # a local apply diverges
    router.apply()
    assert router.rules_source == "local" and router.fleet_state == "refused"
    router.apply_fleet([one], 4)
    assert router.fleet_state == "converged" and router.fleet_summary()["refused_version"] is None
    router.stage_delete(1)
    router.apply()
    assert router.fleet_state == "diverged" and router.fleet_summary()["diverged_from"] == 4
    assert router.fleet_rules_version == 0
