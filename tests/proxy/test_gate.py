"""Gate semantics with trio's mock clock: drain, hold, release order, fail open."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from proxy.gate import Gate


@dataclass(eq=False)
class FakeSession:
    connection_id: int
    schema: str | None = "shop"
    in_txn: bool = False
    inflight: bytes | None = None
    txn: list[bytes] = field(default_factory=list)
    held: bool = False

    @property
    def in_transaction(self) -> bool:
        return self.in_txn

    def inflight_sql(self) -> bytes | None:
        return self.inflight

    def transaction_sql(self) -> Iterable[bytes]:
        return self.txn


class World:
    """Fake relays: run statements through the gate like the relay does."""

    def __init__(self) -> None:
        self.sessions: list[FakeSession] = []
        self.gate = Gate(lambda: self.sessions, release_spacing=0.01)
        self.log: list[tuple[float, int, str]] = []

    def session(self) -> FakeSession:
        session = FakeSession(len(self.sessions) + 1)
        self.sessions.append(session)
        return session

    async def statement(self, session: FakeSession, sql: str, duration: float = 0.001, *, begin: bool = False) -> None:
        raw = sql.encode()
        session.inflight = raw
        if self.gate.holds:
            session.held = True
            tables = self.gate.classifier.classify(raw).resolved(session.schema)
            waiter = await self.gate.admit(session, tables, max_wait=30)
            session.held = False
            if waiter is not None:
                waiter.sent.set()
        self.log.append((trio.current_time(), session.connection_id, sql))
        await trio.sleep(duration)
        session.inflight = None
        if begin:
            session.in_txn = True
        if session.in_txn:
            session.txn.append(raw)
        self.gate.notify()

    async def commit(self, session: FakeSession) -> None:
        await self.statement(session, "COMMIT")
        session.in_txn = False
        session.txn.clear()
        self.gate.notify()


@pytest.fixture
async def world() -> World:
    return World()


async def test_hold_with_idle_table_is_immediate_and_holds_only_that_table(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    one, two = world.session(), world.session()
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=5)
    start = trio.current_time()
    nursery.start_soon(world.statement, one, "UPDATE orders SET x = 1 WHERE id = 1")
    await world.statement(two, "SELECT * FROM customers")  # other tables pass
    assert [entry[1] for entry in world.log] == [2]
    await trio.sleep(0.5)
    assert len(world.log) == 1 and world.gate.held_statements == 1
    await world.gate.release("shop", "orders")
    await trio.sleep(0.1)
    assert [entry[1] for entry in world.log] == [2, 1]
    assert world.log[-1][0] - start == pytest.approx(0.5, abs=0.01)
    assert world.gate.history[-1]["result"] == "released"


async def test_release_keeps_arrival_order(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    sessions = [world.session() for _ in range(6)]
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=5)
    for index, session in enumerate(sessions):
        nursery.start_soon(world.statement, session, f"INSERT INTO orders VALUES ({index})")
        await trio.sleep(0.01)
    await trio.sleep(0.2)
    await world.gate.release("shop", "orders")
    await trio.sleep(1)
    assert [entry[1] for entry in world.log] == [s.connection_id for s in sessions]


async def test_drain_waits_for_inflight_statement(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    slow = world.session()
    nursery.start_soon(world.statement, slow, "UPDATE orders SET a = 1", 0.3)
    await trio.sleep(0.01)
    start = trio.current_time()
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=5)
    assert trio.current_time() - start == pytest.approx(0.29, abs=0.02)


async def test_transaction_that_touched_the_table_drains_not_holds(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    txn = world.session()
    await world.statement(txn, "BEGIN", begin=True)
    await world.statement(txn, "UPDATE orders SET a = 1 WHERE id = 1")
    holding = trio.Event()
    result: list[bool] = []

    async def migrator() -> None:
        result.append(await world.gate.hold("shop", "orders", drain_timeout=2, hold_timeout=5))
        holding.set()

    nursery.start_soon(migrator)
    await trio.sleep(0.2)
    assert not holding.is_set()  # the open transaction blocks the drain
    # ... and its next statement on the table is NOT held (it must finish)
    before = trio.current_time()
    await world.statement(txn, "UPDATE orders SET a = 2 WHERE id = 1")
    assert trio.current_time() - before < 0.01
    await world.commit(txn)
    await holding.wait()
    assert result == [True]
    await world.gate.release("shop", "orders")


async def test_transaction_that_did_not_touch_the_table_is_held(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    txn = world.session()
    await world.statement(txn, "BEGIN", begin=True)
    await world.statement(txn, "UPDATE customers SET a = 1")
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=5)
    nursery.start_soon(world.statement, txn, "INSERT INTO orders VALUES (1)")
    await trio.sleep(0.3)
    assert world.log[-1][2] == "UPDATE customers SET a = 1"
    await world.gate.release("shop", "orders")
    await trio.sleep(0.1)
    assert world.log[-1][2] == "INSERT INTO orders VALUES (1)"


async def test_drain_timeout_releases_everything_and_says_not_now(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    long_txn, other = world.session(), world.session()
    await world.statement(long_txn, "BEGIN", begin=True)
    await world.statement(long_txn, "SELECT * FROM orders FOR UPDATE")
    nursery.start_soon(world.statement, other, "DELETE FROM orders WHERE id = 9")

    async def late_arrival() -> None:
        await trio.sleep(0.1)
        await world.statement(other, "INSERT INTO orders VALUES (2)")

    start = trio.current_time()
    nursery.start_soon(late_arrival)
    assert not await world.gate.hold("shop", "orders", drain_timeout=0.5, hold_timeout=5)
    assert trio.current_time() - start == pytest.approx(0.5, abs=0.06)
    await trio.sleep(0.1)
    assert world.gate.holds == {}
    assert "INSERT INTO orders VALUES (2)" in [entry[2] for entry in world.log]
    history = world.gate.history[-1]
    assert history["result"] == "abandoned"
    assert any("open transaction" in str(b) for b in history["blockers"])  # type: ignore[attr-defined]


async def test_hold_expires_by_itself(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    session = world.session()
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=2)
    start = trio.current_time()
    await world.statement(session, "SELECT * FROM orders")  # the migrator never releases
    assert trio.current_time() - start == pytest.approx(2, abs=0.02)
    assert world.gate.history[-1]["result"] == "expired"


async def test_statement_with_unknown_tables_counts_as_touching(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    caller = world.session()
    nursery.start_soon(world.statement, caller, "CALL do_things()", 0.2)
    await trio.sleep(0.01)
    start = trio.current_time()
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=5)
    assert trio.current_time() - start >= 0.18  # drained only after the CALL ended
    nursery.start_soon(world.statement, caller, "CALL do_things()")
    await trio.sleep(0.1)
    assert world.gate.held_statements == 1
    await world.gate.release("shop", "orders")


async def test_schema_qualified_and_default_schema(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    await nursery.start(world.gate.run)
    elsewhere = world.session()
    elsewhere.schema = "other"
    assert await world.gate.hold("shop", "orders", drain_timeout=1, hold_timeout=5)
    await world.statement(elsewhere, "SELECT * FROM orders")  # other.orders: not held
    nursery.start_soon(world.statement, elsewhere, "SELECT * FROM shop.orders")
    await trio.sleep(0.1)
    assert world.gate.held_statements == 1
    await world.gate.release("shop", "orders")


async def test_admit_fails_open_after_max_wait(autojump_clock: trio.testing.MockClock, world: World) -> None:
    session = world.session()
    world.gate.holds["shop.orders"] = __import__("proxy.gate", fromlist=["Hold"]).Hold(
        "shop.orders", frozenset({"shop.orders"}), __import__("proxy.gate", fromlist=["HoldPhase"]).HoldPhase.HOLDING,
        0.0, 99,
    )
    start = trio.current_time()
    tables = frozenset({"shop.orders"})
    await world.gate.admit(session, tables, max_wait=3)
    assert trio.current_time() - start == pytest.approx(3, abs=0.01)


async def test_cancelled_drain_leaves_nothing_held(
    autojump_clock: trio.testing.MockClock, world: World, nursery: trio.Nursery
) -> None:
    """The leader gave up mid-drain (its hold task is cancelled): the table must
    not stay held behind it."""
    await nursery.start(world.gate.run)
    txn, other = world.session(), world.session()
    await world.statement(txn, "BEGIN", begin=True)
    await world.statement(txn, "UPDATE orders SET a = 1")
    with trio.move_on_after(0.3):
        await world.gate.hold("shop", "orders", drain_timeout=5, hold_timeout=5)
    assert world.gate.holds == {}
    start = trio.current_time()
    await world.statement(other, "SELECT * FROM orders")
    assert trio.current_time() - start < 0.01
    assert world.gate.history[-1]["result"] == "abandoned"
