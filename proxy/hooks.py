"""Lifecycle hooks of a migration: run a command or call a URL at its milestones.

gh-ost style.  Six hooks, each either a shell command (run with ``/bin/sh -c``,
the migration's facts in ``TIDEGATE_*`` environment variables) or an
``http://``/``https://`` URL (POSTed the same facts as a JSON object):

========================  ====================================================
``startup``               the leader starts (or resumes) the migration
``row_copy_complete``     the copy is done (verification and cut-over follow)
``before_cut_over``       before the first cut-over attempt; **may veto**: while
                          it fails the migration stays postponed and the hook
                          is retried every ``retry_interval`` seconds
``after_cut_over``        the new table is in place (cleanup follows)
``success``               the migration completed
``failure``               it failed or was cancelled (``TIDEGATE_MIGRATION_STATE``)
========================  ====================================================

A hook succeeds when the command exits 0 / the URL answers 2xx within
``timeout`` seconds.  Hooks run one at a time in the order of the events;
only ``before_cut_over`` holds the migration up.  Configured globally
(``[hooks]`` in the configuration) and per migration (options
``hook_<name>='command or URL'``, an empty value switches the global one off,
``hook_timeout``, ``hook_retry_interval``).

A command given in a migration's options runs a shell on whichever sidecar
leads it, and the request travels through the state schema, which anyone
who can write that table can fill: such commands run only where the
sidecar's own configuration says ``hooks.allow_option_commands = true``.
URLs from options are always allowed.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from proxy.events import NULL_EVENTS, EventSink

log = logging.getLogger("tidegate.hooks")

HOOKS = ("startup", "row_copy_complete", "before_cut_over", "after_cut_over", "success", "failure")
#: per-migration options this module owns (``hook_<name>``, timeout, retry interval)
OPTIONS = (*(f"hook_{name}" for name in HOOKS), "hook_timeout", "hook_retry_interval")
ENV_PREFIX = "TIDEGATE_MIGRATION_"
#: output of a command kept for the event log
OUTPUT_TAIL = 500


class HookError(ValueError):
    """A hook setting that cannot work; the message names it."""


def is_url(target: str) -> bool:
    return "://" in target.split()[0] if target.strip() else False


def check_target(name: str, target: str) -> str:
    """A command, or an http(s) URL with a host; raises ``HookError`` naming ``name``."""
    text = target.strip()
    if not text:
        return ""
    if "://" in text.split()[0]:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HookError(f"{name}: a URL hook must be http:// or https:// with a host, got {text!r}")
    return text


def check_seconds(name: str, value: object, *, low: float = 0.0) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        raise HookError(f"{name}: expected seconds, got {value!r}") from None
    if not seconds > low or seconds != seconds or seconds == float("inf"):
        raise HookError(f"{name}: must be more than {low:g} seconds, got {value!r}")
    return seconds


@dataclass(frozen=True)
class HookSettings:
    """Which hooks run what; ``""`` or absent means none."""

    targets: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 30.0
    retry_interval: float = 10.0
    #: commands (not only URLs) may come from a migration's options
    allow_option_commands: bool = False

    def target(self, name: str) -> str:
        return self.targets.get(name, "")

    def with_options(self, options: Mapping[str, str]) -> HookSettings:
        """The per-migration options (``hook_*``) over these settings."""
        targets = dict(self.targets)
        for name in HOOKS:
            key = f"hook_{name}"
            if key in options:
                targets[name] = check_target(key, options[key])
                if targets[name] and not is_url(targets[name]) and not self.allow_option_commands:
                    raise HookError(
                        f"{key}: a command from migration options runs a shell on the leading sidecar; "
                        "its configuration must allow it (hooks.allow_option_commands = true), or give an "
                        "http(s):// URL, or configure the command in [hooks]"
                    )
        timeout = check_seconds("hook_timeout", options["hook_timeout"]) if "hook_timeout" in options \
            else self.timeout
        retry = check_seconds("hook_retry_interval", options["hook_retry_interval"]) \
            if "hook_retry_interval" in options else self.retry_interval
        return replace(self, targets={k: v for k, v in targets.items() if v}, timeout=timeout, retry_interval=retry)

    def to_json(self) -> str:
        return json.dumps({"targets": dict(self.targets), "timeout": self.timeout,
                           "retry_interval": self.retry_interval,
                           "allow_option_commands": self.allow_option_commands})

    @classmethod
    def from_json(cls, text: str | None) -> HookSettings:
        if not text:
            return cls()
        data = json.loads(text)
        return cls(dict(data.get("targets") or {}), float(data.get("timeout", 30.0)),
                   float(data.get("retry_interval", 10.0)), bool(data.get("allow_option_commands", False)))


@dataclass
class HookResult:
    ok: bool
    detail: str
    seconds: float


def environment(hook: str, facts: Mapping[str, Any]) -> dict[str, str]:
    """``TIDEGATE_HOOK`` and ``TIDEGATE_MIGRATION_<FACT>`` for each fact."""
    env = {"TIDEGATE_HOOK": hook}
    for key, value in facts.items():
        if value is None:
            continue
        env[ENV_PREFIX + key.upper()] = "1" if value is True else "0" if value is False else str(value)
    return env


async def run_hook(hook: str, target: str, facts: Mapping[str, Any], timeout: float) -> HookResult:
    """Run one hook now; never raises (a failure is a result)."""
    started = time.monotonic()
    try:
        with trio.fail_after(timeout):
            if is_url(target):
                ok, detail = await _call(hook, target, facts, timeout)
            else:
                ok, detail = await _command(hook, target, facts)
    except trio.TooSlowError:
        ok, detail = False, f"timed out after {timeout:g}s"
    except OSError as error:
        ok, detail = False, f"could not run: {error}"
    return HookResult(ok, detail, time.monotonic() - started)


async def _command(hook: str, command: str, facts: Mapping[str, Any]) -> tuple[bool, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(ENV_PREFIX) and key != "TIDEGATE_LEAD_OPTIONS"}
    env.update(environment(hook, facts))
    result = await trio.run_process(["/bin/sh", "-c", command], env=env, check=False,
                                    capture_stdout=True, capture_stderr=True, stdin=b"")
    output = (result.stdout + result.stderr).decode("utf-8", "replace").strip()
    tail = output[-OUTPUT_TAIL:]
    if result.returncode == 0:
        return True, tail
    return False, f"exit code {result.returncode}" + (f": {tail}" if tail else "")


async def _call(hook: str, url: str, facts: Mapping[str, Any], timeout: float) -> tuple[bool, str]:
    body = json.dumps({"hook": hook, **{k: v for k, v in facts.items() if v is not None}}).encode()

    def post() -> tuple[bool, str]:
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "tidegate-hook", "X-Tidegate-Hook": hook,
        })
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read(OUTPUT_TAIL).decode("utf-8", "replace")
                return 200 <= response.status < 300, f"HTTP {response.status}" + (f": {text}" if text else "")
        except urllib.error.HTTPError as error:
            text = error.read(OUTPUT_TAIL).decode("utf-8", "replace") if error.fp else ""
            return False, f"HTTP {error.code}" + (f": {text}" if text else "")
        except urllib.error.URLError as error:
            return False, f"could not call: {error.reason}"

    return await trio.to_thread.run_sync(post, abandon_on_cancel=True)


class Hooks:
    """One migration's hooks: fired in order by one runner task; ``before_cut_over`` inline."""

    def __init__(self, settings: HookSettings, events: EventSink = NULL_EVENTS, *,
                 migration_id: int | None = None) -> None:
        self.settings = settings
        self.events = events
        self.migration_id = migration_id
        self._send, self._receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](len(HOOKS) * 4)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self.results: list[tuple[str, HookResult]] = []

    def configured(self, name: str) -> bool:
        return bool(self.settings.target(name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for name, facts in self._receive:
            try:
                await self._run(name, facts)
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    def fire(self, name: str, facts: Mapping[str, Any]) -> None:
        """Queue ``name`` with the facts of this moment (a no-op when it is not configured)."""
        if not self.configured(name):
            return
        try:
            self._send.send_nowait((name, dict(facts)))
        except trio.WouldBlock:
            log.warning("hook %s dropped: too many hooks queued", name)
            return
        self._pending += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    async def wait_idle(self, timeout: float | None = None) -> None:
        """Until every queued hook ran (bounded by ``timeout``)."""
        with trio.move_on_after(timeout if timeout is not None else self.settings.timeout * len(HOOKS)):
            await self._idle.wait()

    async def run_now(self, name: str, facts: Mapping[str, Any]) -> HookResult:
        """Run ``name`` after the queued ones; the caller decides what a failure means."""
        await self.wait_idle()
        return await self._run(name, dict(facts))

    async def _run(self, name: str, facts: dict[str, Any]) -> HookResult:
        target = self.settings.target(name)
        result = await run_hook(name, target, facts, self.settings.timeout)
        self.results.append((name, result))
        level = logging.INFO if result.ok else logging.WARNING
        log.log(level, "migration %s: hook %s %s in %.2fs: %s", self.migration_id, name,
                "succeeded" if result.ok else "failed", result.seconds, result.detail or "-")
        self.events.emit("hook.ok" if result.ok else "hook.failed", migration=self.migration_id, hook=name,
                         seconds=round(result.seconds, 6), detail=result.detail or None,
                         target=_redact(target))
        return result


def _redact(target: str) -> str:
    """A URL without its credentials; a command as written (its first 200 characters)."""
    if is_url(target):
        parts = urllib.parse.urlsplit(target)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return target[:200]
