"""User directory: reload rate limit and sharing, with trio's mock clock."""

from __future__ import annotations

import trio
import trio.testing

from proxy.protocol import auth
from proxy.users import Account, UserDirectory, accounts_from_mysql_user


async def test_unknown_user_waits_for_the_next_reload_slot(autojump_clock: trio.testing.MockClock) -> None:
    loads: list[float] = []
    users = {"early": Account.from_password("early", "x")}

    async def loader() -> list[Account]:
        loads.append(trio.current_time())
        return list(users.values())

    directory = UserDirectory(loader=loader, min_refresh_interval=1.0)
    await directory.refresh(force=True)
    users["late"] = Account.from_password("late", "y")
    account = await directory.lookup("late")  # too early for a reload: waits ~1 s, then reloads
    assert account is not None and account.name == "late"
    assert len(loads) == 2 and 0.99 <= loads[1] - loads[0] <= 1.01


async def test_concurrent_lookups_share_one_reload(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def loader() -> list[Account]:
        nonlocal calls
        calls += 1
        await trio.sleep(0.1)
        return [Account.from_password("someone", "pw")]

    directory = UserDirectory(loader=loader, min_refresh_interval=1.0)
    await trio.sleep(5)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(directory.lookup, "someone")
    assert calls == 1


def test_native_verification_recovers_stage1() -> None:
    account = Account.from_hash("app", [auth.native_hash_text("s3cret")])
    scramble = b"abcdefghij0123456789"
    token = auth.native_token(auth.native_stage1("s3cret"), scramble)
    assert account.verify_native(token, scramble) == auth.native_stage1("s3cret")
    assert account.verify_native(auth.native_token(auth.native_stage1("nope"), scramble), scramble) is None
    assert account.verify_native(b"", scramble) is None


def test_mysql_user_rows() -> None:
    rows: list[dict[str, str | None]] = [
        {"User": "app", "Host": "%", "plugin": "mysql_native_password", "authentication_string": auth.native_hash_text("a")},
        {"User": "app", "Host": "10.%", "plugin": "mysql_native_password", "authentication_string": auth.native_hash_text("b")},
        {"User": "nopass", "Host": "%", "plugin": "mysql_native_password", "authentication_string": ""},
        {"User": "ed", "Host": "%", "plugin": "ed25519", "authentication_string": "xyz"},
        {"User": "", "Host": "localhost", "plugin": "", "authentication_string": ""},
    ]
    accounts = {a.name: a for a in accounts_from_mysql_user(rows)}
    assert set(accounts) == {"app", "nopass", "ed"}
    assert len(accounts["app"].stage2) == 2
    assert accounts["nopass"].empty_password
    assert not accounts["ed"].terminable and accounts["ed"].plugin == "ed25519"
