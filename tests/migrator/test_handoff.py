"""The reader thread's hand-off to trio: order kept, wake-ups coalesced, backpressure, shutdown."""

from __future__ import annotations

import threading

import trio

from migrator.binlog import BinlogItem, _Handoff


def _item(n: int, gtid: str | None = None) -> BinlogItem:
    return BinlogItem(keys=[((n,), False)], gtid=gtid, transactions=1 if gtid else 0)


def test_merge_keeps_order_and_the_last_position() -> None:
    merged = BinlogItem.merge([
        BinlogItem(keys=[((1,), False)], changelog=[("heartbeat", "a")], gtid="0-1-5", transactions=2),
        BinlogItem(keys=[((2,), True)], ddl=["ALTER TABLE t ADD x INT"], gtid="0-1-6", transactions=1),
        BinlogItem(keys=[((3,), False)]),  # part of a huge transaction: no position of its own
    ])
    assert merged.keys == [((1,), False), ((2,), True), ((3,), False)]
    assert merged.changelog == [("heartbeat", "a")]
    assert merged.ddl == ["ALTER TABLE t ADD x INT"]
    assert (merged.gtid, merged.transactions) == ("0-1-6", 3)
    assert BinlogItem.merge([BinlogItem(keys=[((9,), False)])]).gtid is None


async def test_items_arrive_in_order_in_fewer_wakeups() -> None:
    stop = threading.Event()
    handoff = _Handoff(trio.lowlevel.current_trio_token(), stop, limit=1000)
    send, receive = trio.open_memory_channel[BinlogItem](1000)
    received: list[BinlogItem] = []

    def reader() -> None:
        for n in range(5000):
            handoff.put(_item(n, f"0-1-{n}"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handoff.pump, send)
        await trio.to_thread.run_sync(reader)
        while sum(len(i.keys) for i in received) < 5000:
            received.append(await receive.receive())
        nursery.cancel_scope.cancel()
    assert [k for item in received for k, _ in item.keys] == [(n,) for n in range(5000)]
    assert received[-1].gtid == "0-1-4999"
    assert sum(i.transactions for i in received) == 5000
    assert len(received) < 5000  # coalesced (one per wake-up, not one per put)


async def test_a_slow_consumer_holds_the_reader_back() -> None:
    stop = threading.Event()
    handoff = _Handoff(trio.lowlevel.current_trio_token(), stop, limit=3)
    send, receive = trio.open_memory_channel[BinlogItem](0)
    put = 0

    def reader() -> None:
        nonlocal put
        for n in range(50):
            handoff.put(_item(n))
            put += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handoff.pump, send)
        nursery.start_soon(trio.to_thread.run_sync, reader)
        await trio.sleep(0.3)  # nobody receives: the pump holds one merged item, the queue fills
        assert put <= 3 + 3 + 1
        got = 0
        while got < 50:
            got += len((await receive.receive()).keys)
        nursery.cancel_scope.cancel()
    assert put == 50


async def test_a_closed_consumer_stops_the_reader() -> None:
    stop = threading.Event()
    handoff = _Handoff(trio.lowlevel.current_trio_token(), stop, limit=2)
    send, receive = trio.open_memory_channel[BinlogItem](0)
    await receive.aclose()

    def reader() -> None:
        while not stop.is_set():
            handoff.put(_item(1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handoff.pump, send)
        with trio.fail_after(10):
            await trio.to_thread.run_sync(reader)
    assert stop.is_set()
