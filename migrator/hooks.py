"""Lifecycle hooks of a migration: run commands or call URLs at its milestones.

gh-ost style.  Six hooks, each one or more shell commands (run with
``/bin/sh -c``, the migration's facts in ``TIDEGATE_MIGRATION_*`` environment
variables) or ``http://``/``https://`` URLs (POSTed the same facts as a JSON
object):

========================  ====================================================
``startup``               the migration starts (or resumes)
``row_copy_complete``     the copy is done (verification and cut-over follow)
``before_cut_over``       before the first cut-over attempt; **may veto**: while
                          it fails the migration stays postponed and the hook
                          is retried every ``retry_interval`` seconds
``after_cut_over``        the new table is in place (cleanup follows)
``success``               the migration completed
``failure``               it failed, was refused, cancelled or interrupted
                          (``TIDEGATE_MIGRATION_STATE``, ``_ERROR``)
========================  ====================================================

A hook succeeds when each of its commands exits 0 / URLs answers 2xx, each
within ``timeout`` seconds; the first that fails ends that hook.  Hooks run
one at a time in the order of the events (a task of their own); only
``before_cut_over`` holds the migration up, and ``success``/``failure`` are
awaited (bounded) before the migration returns.

``Migration`` (``migrator.runner``) calls a :class:`MigrationHooks` at its
milestones; :class:`Hooks` is the implementation that runs commands and
URLs, :class:`NoHooks` the no-op one.  The sidecar (``proxy.hooks``) reuses
``Hooks`` with its own settings and event log.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

log = logging.getLogger("tidegate.hooks")

HOOKS = ("startup", "row_copy_complete", "before_cut_over", "after_cut_over", "success", "failure")
ENV_PREFIX = "TIDEGATE_MIGRATION_"
#: output of a command kept for the log and the event
OUTPUT_TAIL = 500
#: ``--hooks-path``: a file runs for a hook when its name starts with this + the hook's dashed name
FILE_PREFIX = "tidegate-on-"


class HookError(ValueError):
    """A hook setting that cannot work; the message names it."""


class EventSink(Protocol):
    """Where hook results are recorded as events (the sidecar's event log)."""

    def emit(self, event: str, **fields: Any) -> dict[str, Any]: ...


class NullEvents:
    """Records nothing."""

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        return {}


NULL_EVENTS = NullEvents()


def hook_name(text: str) -> str:
    """``before-cut-over`` or ``before_cut_over`` → ``before_cut_over``; ``HookError`` if unknown."""
    name = text.strip().lower().replace("-", "_")
    if name not in HOOKS:
        raise HookError(f"unknown hook {text.strip()!r}; one of: {', '.join(h.replace('_', '-') for h in HOOKS)}")
    return name


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
        try:
            parts.port  # noqa: B018 - a bad port raises only when read
        except ValueError:
            raise HookError(f"{name}: the URL's port is not a number from 0 to 65535: {text!r}") from None
    return text


def check_seconds(name: str, value: object, *, low: float = 0.0) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        raise HookError(f"{name}: expected seconds, got {value!r}") from None
    if not seconds > low or seconds != seconds or seconds == float("inf"):
        raise HookError(f"{name}: must be more than {low:g} seconds, got {value!r}")
    return seconds


def hooks_path_targets(directory: str | Path) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """``--hooks-path``: the executable ``tidegate-on-<hook>*`` files of ``directory``, per hook, in name order.

    Returns (commands per hook, warnings about matching files that cannot run).
    """
    path = Path(directory)
    if not path.is_dir():
        raise HookError(f"--hooks-path {str(directory)!r} is not a directory")
    try:
        entries = sorted(path.iterdir(), key=lambda p: p.name)
    except OSError as error:
        raise HookError(f"--hooks-path {str(directory)!r}: {error.strerror or error}") from None
    found: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    for name in HOOKS:
        prefix = FILE_PREFIX + name.replace("_", "-")
        commands: list[str] = []
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            if not entry.is_file() or not os.access(entry, os.X_OK):
                warnings.append(f"hooks path: {entry} is not an executable file; ignored")
                continue
            commands.append(shlex.quote(str(entry.resolve())))
        if commands:
            found[name] = tuple(commands)
    for entry in entries:
        if entry.name.startswith(FILE_PREFIX) and not any(
                entry.name.startswith(FILE_PREFIX + name.replace("_", "-")) for name in HOOKS):
            warnings.append(f"hooks path: {entry.name} names no hook; ignored")
    return found, warnings


@dataclass(frozen=True)
class HookSettings:
    """Which hooks run what; ``""`` or absent means none.  A hook may have several targets (run in order)."""

    targets: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)
    timeout: float = 30.0
    retry_interval: float = 10.0

    def target(self, name: str) -> str:
        """The first target of ``name`` (``""``: none)."""
        chain = self.chain(name)
        return chain[0] if chain else ""

    def chain(self, name: str) -> tuple[str, ...]:
        """Every target of ``name``, in the order they run."""
        value = self.targets.get(name, ())
        return tuple(t for t in ((value,) if isinstance(value, str) else value) if t)

    def describe(self) -> list[str]:
        """One line per configured hook (for a plan); URLs without their credentials."""
        lines = []
        for name in HOOKS:
            for target in self.chain(name):
                lines.append(f"hook {name}: {redact(target)}")
        if lines:
            lines.append(f"hooks: timeout {self.timeout:g}s each, before_cut_over retried every "
                         f"{self.retry_interval:g}s while it vetoes")
        return lines


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
    """Run one target of a hook now; never raises (a failure is a result)."""
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


class MigrationHooks(Protocol):
    """What ``Migration`` calls at its milestones.  ``run`` is started before the first call."""

    @property
    def retry_interval(self) -> float:
        """Seconds between asks of a vetoing ``before_cut_over``."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run queued hooks until cancelled."""
        ...

    def fire(self, name: str, facts: Mapping[str, Any]) -> None:
        """Queue ``startup``, ``row_copy_complete`` or ``after_cut_over``; never blocks, never raises."""
        ...

    async def veto(self, facts: Mapping[str, Any]) -> str | None:
        """``before_cut_over``: None to go ahead, else why not (asked again after ``retry_interval``)."""
        ...

    async def finish(self, name: str, facts: Mapping[str, Any]) -> None:
        """``success`` or ``failure``, after every queued hook; bounded by the hooks' timeouts."""
        ...

    def describe(self) -> list[str]:
        """Plan lines saying which hooks run what."""
        ...


class NoHooks:
    """No hooks configured."""

    retry_interval = 10.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def fire(self, name: str, facts: Mapping[str, Any]) -> None:
        return None

    async def veto(self, facts: Mapping[str, Any]) -> str | None:
        await trio.lowlevel.checkpoint()
        return None

    async def finish(self, name: str, facts: Mapping[str, Any]) -> None:
        await trio.lowlevel.checkpoint()

    def describe(self) -> list[str]:
        return []


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
        self._stopped = False
        self.results: list[tuple[str, HookResult]] = []

    @property
    def retry_interval(self) -> float:
        return self.settings.retry_interval

    def configured(self, name: str) -> bool:
        return bool(self.settings.chain(name))

    def describe(self) -> list[str]:
        return self.settings.describe()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            async for name, facts in self._receive:
                try:
                    await self._run(name, facts)
                finally:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()
        finally:
            # Cancelled (the migration was interrupted): nobody runs what is queued; no one waits for it.
            self._stopped = True
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
        """Until every queued hook ran (bounded by ``timeout``); at once when the runner has stopped."""
        if self._stopped:
            await trio.lowlevel.checkpoint()
            return
        longest = max((len(self.settings.chain(name)) for name in HOOKS), default=1) or 1
        with trio.move_on_after(timeout if timeout is not None else self.settings.timeout * len(HOOKS) * longest):
            await self._idle.wait()

    async def run_now(self, name: str, facts: Mapping[str, Any]) -> HookResult:
        """Run ``name`` after the queued ones; the caller decides what a failure means."""
        await self.wait_idle()
        return await self._run(name, dict(facts))

    async def veto(self, facts: Mapping[str, Any]) -> str | None:
        if not self.configured("before_cut_over"):
            return None
        result = await self.run_now("before_cut_over", facts)
        return None if result.ok else f"hook before_cut_over: {result.detail}"

    async def finish(self, name: str, facts: Mapping[str, Any]) -> None:
        if self.configured(name):
            await self.run_now(name, facts)
        else:
            await self.wait_idle()

    async def _run(self, name: str, facts: dict[str, Any]) -> HookResult:
        chain = self.settings.chain(name)
        result = HookResult(True, "", 0.0)
        spent = 0.0
        for target in chain:
            result = await run_hook(name, target, facts, self.settings.timeout)
            spent += result.seconds
            self.results.append((name, result))
            migration = self.migration_id if self.migration_id is not None else facts.get("id")
            level = logging.INFO if result.ok else logging.WARNING
            log.log(level, "migration %s: hook %s %s in %.2fs: %s", migration, name,
                    "succeeded" if result.ok else "failed", result.seconds, result.detail or "-")
            self.events.emit("hook.ok" if result.ok else "hook.failed", migration=migration, hook=name,
                             seconds=round(result.seconds, 6), detail=result.detail or None,
                             target=redact(target))
            if not result.ok:
                if len(chain) > 1:
                    result.detail = f"{redact(target)}: {result.detail}"
                break
        result.seconds = spent
        return result


def parse_hook_flag(text: str) -> tuple[str, str]:
    """``--hook NAME=COMMAND_OR_URL`` → (hook name, checked target)."""
    name, sep, target = text.partition("=")
    if not sep or not name.strip():
        raise HookError(f"--hook {text!r}: expected NAME=COMMAND_OR_URL, e.g. --hook success='echo done'")
    try:
        hook = hook_name(name)
    except HookError as error:
        raise HookError(f"--hook {name.strip()}=…: {error}") from None
    checked = check_target(f"--hook {name.strip()}", target)
    if not checked:
        raise HookError(f"--hook {name.strip()}: the command or URL is empty")
    return hook, checked


def settings_from_flags(hooks: Sequence[str], hooks_path: str | None, timeout: str | None,
                        retry_interval: str | None) -> tuple[HookSettings, list[str]]:
    """The CLI's hooks: ``--hooks-path`` files first (name order), then each ``--hook`` in the order given."""
    targets: dict[str, tuple[str, ...]] = {}
    warnings: list[str] = []
    if hooks_path is not None:
        targets, warnings = hooks_path_targets(hooks_path)
    for text in hooks:
        name, target = parse_hook_flag(text)
        targets[name] = (*targets.get(name, ()), target)
    settings = HookSettings(
        targets,
        timeout=check_seconds("--hook-timeout", timeout) if timeout is not None else HookSettings.timeout,
        retry_interval=check_seconds("--hook-retry-interval", retry_interval) if retry_interval is not None
        else HookSettings.retry_interval,
    )
    return settings, warnings


def redact(target: str) -> str:
    """A URL without its credentials; a command as written (its first 200 characters)."""
    if is_url(target):
        parts = urllib.parse.urlsplit(target)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return target if len(target) <= 200 else target[:200] + "…"
