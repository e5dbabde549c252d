"""Run a real tidegate proxy (in a thread with its own trio loop) for client tests.

Blocking clients (pymysql, mysqlclient, mysql-connector, the CLI, sysbench)
cannot share the test's trio loop, so the proxy gets its own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio

from proxy import sandbox
from proxy.app import App
from proxy.config import load_config
from proxy.relay import Proxy


@dataclass
class RunningProxy:
    app: App
    proxy: Proxy
    host: str
    port: int
    thread: threading.Thread
    token: trio.lowlevel.TrioToken

    def stop(self, timeout: float = 15.0) -> None:
        try:
            trio.from_thread.run_sync(self.app.shutdown, trio_token=self.token)
        except trio.RunFinishedError:
            pass
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "proxy did not shut down"

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a sync function inside the proxy's trio thread."""
        return trio.from_thread.run_sync(function, *args, trio_token=self.token)


def start_proxy(args: list[str], metrics: Any = None) -> RunningProxy:
    config = load_config(
        ["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", *args],
        env={},
    )
    app = App(config, metrics)
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["token"] = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            box["proxy"] = await nursery.start(app.run)
            started.set()

    def target() -> None:
        try:
            trio.run(main)
        except BaseException as error:  # surfaced to the test below
            box["error"] = error
            started.set()

    thread = threading.Thread(target=target, name="tidegate-proxy", daemon=True)
    thread.start()
    started.wait(30)
    if "error" in box:
        raise box["error"]
    proxy: Proxy = box["proxy"]
    host, port = proxy.listening[0]
    return RunningProxy(app, proxy, host, port, thread, box["token"])


@pytest.fixture(scope="session")
def app_user(primary: sandbox.Instance) -> tuple[str, str]:
    """An application account with native password, as most deployments have."""
    primary.execute(
        "CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY 'app-secret'",
        "GRANT ALL ON *.* TO 'app'@'%'",
    )
    return "app", "app-secret"


@pytest.fixture(scope="session")
def tidegate(primary: sandbox.Instance, app_user: tuple[str, str]) -> Iterator[RunningProxy]:
    """One proxy for the session, users loaded from the primary via the service account."""
    running = start_proxy(["--backend", primary.dsn()])
    try:
        yield running
    finally:
        running.stop()


T = TypeVar("T")


def eventually(check: Callable[[], T | None], what: str = "condition", timeout: float = 5.0,
               interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {result!r})")
        time.sleep(interval)
