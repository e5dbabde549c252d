"""Who may log in through the proxy, and with what secret.

Accounts come from the configuration (clear password or native ``*HEX``
hash) and, when a service account is configured, from the primary's
``mysql.user``.  The backend-loaded set is refreshed when an unknown user
or a failed login appears (rate limited), so a password changed in the
database works through the proxy within a second.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import trio

from proxy.protocol import auth

log = logging.getLogger("tidegate.users")


@dataclass
class Account:
    name: str
    #: SHA1(SHA1(password)) for each host entry of the user; empty tuple = no password
    stage2: tuple[bytes, ...] = ()
    password: str | None = None
    plugin: str = auth.NATIVE
    source: str = "config"
    #: SHA256(SHA256(password)) once known: caching_sha2_password fast path
    sha2_digest: bytes | None = None
    #: SHA1(password) once known (from the password or a successful native login)
    stage1: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_password(cls, name: str, password: str, source: str = "config") -> Account:
        if password == "":
            return cls(name, (), "", source=source, sha2_digest=None, stage1=b"")
        stage1 = auth.native_stage1(password)
        return cls(
            name,
            (auth.sha1(stage1),),
            password,
            source=source,
            sha2_digest=auth.caching_sha2_digest(password),
            stage1=stage1,
        )

    @classmethod
    def from_hash(cls, name: str, hashes: Iterable[str], source: str = "config") -> Account:
        stage2 = tuple(auth.native_stage2_from_hash(h) for h in hashes if h)
        return cls(name, stage2, None, source=source)

    @property
    def empty_password(self) -> bool:
        return self.password == "" and not self.stage2

    @property
    def terminable(self) -> bool:
        """Can the proxy check this account's password and log in as it?"""
        return self.empty_password or bool(self.stage2)

    def verify_native(self, token: bytes, scramble: bytes) -> bytes | None:
        """SHA1(password) if the scramble response is right, else None."""
        if self.empty_password:
            return b"" if not token else None
        for stage2 in self.stage2:
            stage1 = auth.native_recover_stage1(token, scramble, stage2)
            if stage1 is not None:
                self.stage1 = stage1
                return stage1
        return None

    def verify_clear(self, password: str) -> bytes | None:
        if self.empty_password:
            return b"" if password == "" else None
        stage1 = auth.native_stage1(password)
        if auth.sha1(stage1) in self.stage2:
            self.stage1 = stage1
            self.sha2_digest = auth.caching_sha2_digest(password)
            return stage1
        return None


Loader = Callable[[], Awaitable[list[Account]]]


class UserDirectory:
    def __init__(
        self,
        configured: Iterable[Account] = (),
        loader: Loader | None = None,
        min_refresh_interval: float = 1.0,
    ) -> None:
        self._configured = {account.name: account for account in configured}
        self._loaded: dict[str, Account] = {}
        self._loader = loader
        self._interval = min_refresh_interval
        self._last_refresh = -1e9
        self._lock = trio.Lock()
        self._generation = 0
        self.last_error: str | None = None

    def get(self, name: str) -> Account | None:
        return self._configured.get(name) or self._loaded.get(name)

    def names(self) -> list[str]:
        return sorted(set(self._configured) | set(self._loaded))

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload backend users; returns whether a reload happened.

        Reloads are at most one per ``min_refresh_interval``: a caller that
        comes too early waits for the next slot (so a user created a moment
        ago still gets in), and callers waiting together share one reload.
        """
        if self._loader is None:
            return False
        generation = self._generation
        async with self._lock:
            if self._generation != generation:
                return True  # someone reloaded while we waited for the lock
            if not force:
                wait = self._last_refresh + self._interval - trio.current_time()
                if wait > 0:
                    await trio.sleep(wait)
            self._last_refresh = trio.current_time()
            try:
                accounts = await self._loader()
            except Exception as error:
                self.last_error = str(error)
                log.warning("could not load users from the primary: %s", error)
                return False
            self.last_error = None
            previous = self._loaded
            loaded: dict[str, Account] = {}
            for account in accounts:
                old = previous.get(account.name)
                if old is not None and old.stage2 == account.stage2:
                    # Keep what earlier logins taught us (stage1, sha2 digest).
                    account.stage1 = old.stage1
                    account.sha2_digest = old.sha2_digest
                loaded[account.name] = account
            self._loaded = loaded
            self._generation += 1
            return True

    async def lookup(self, name: str) -> Account | None:
        account = self.get(name)
        if account is None and await self.refresh():
            account = self.get(name)
        return account


def accounts_from_mysql_user(rows: list[dict[str, str | None]]) -> list[Account]:
    """Rows of ``SELECT User, Host, plugin, authentication_string FROM mysql.user``."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        user = row.get("User") or ""
        if not user:
            continue  # anonymous accounts are never matched by the proxy
        grouped.setdefault(user, []).append((row.get("plugin") or "", row.get("authentication_string") or ""))
    accounts = []
    for user, entries in grouped.items():
        hashes = [h for plugin, h in entries if plugin in ("mysql_native_password", "") and h.startswith("*")]
        empty = any(plugin in ("mysql_native_password", "") and not h for plugin, h in entries)
        if hashes:
            accounts.append(Account.from_hash(user, hashes, source="backend"))
        elif empty:
            accounts.append(Account(user, (), "", source="backend"))
        else:
            plugins = sorted({plugin for plugin, _ in entries})
            accounts.append(Account(user, (), None, plugin=",".join(plugins), source="backend"))
    return accounts
