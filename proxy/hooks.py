"""Lifecycle hooks of a led migration: the sidecar's settings over ``migrator.hooks``.

The hook runner itself (six hooks, commands run with ``/bin/sh -c`` and the
facts in ``TIDEGATE_MIGRATION_*`` variables, URLs POSTed the facts as JSON,
``before_cut_over`` may veto) lives in ``migrator.hooks`` so that
``tidegate migrate`` has the same hooks; everything the sidecar imported from
here is re-exported.  What is the sidecar's own:

* hooks are configured globally (``[hooks]`` in the configuration) and per
  migration (options ``hook_<name>='command or URL'``, an empty value
  switches the global one off, ``hook_timeout``, ``hook_retry_interval``);
* a command given in a migration's options runs a shell on whichever sidecar
  leads it, and the request travels through the state schema, which anyone
  who can write that table can fill: such commands run only where the
  sidecar's own configuration says ``hooks.allow_option_commands = true``.
  URLs from options are always allowed;
* the settings travel to a child leader as JSON (``to_json``/``from_json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from migrator import hooks as _base
from migrator.hooks import (
    ENV_PREFIX,
    HOOKS,
    OUTPUT_TAIL,
    HookError,
    HookResult,
    Hooks,
    check_seconds,
    check_target,
    environment,
    is_url,
    run_hook,
)

#: per-migration options this module owns (``hook_<name>``, timeout, retry interval)
OPTIONS = (*(f"hook_{name}" for name in HOOKS), "hook_timeout", "hook_retry_interval")

__all__ = [
    "ENV_PREFIX",
    "HOOKS",
    "OPTIONS",
    "OUTPUT_TAIL",
    "HookError",
    "HookResult",
    "HookSettings",
    "Hooks",
    "check_seconds",
    "check_target",
    "environment",
    "is_url",
    "run_hook",
]


@dataclass(frozen=True)
class HookSettings(_base.HookSettings):
    """Which hooks run what, plus whether migration options may carry commands."""

    #: commands (not only URLs) may come from a migration's options
    allow_option_commands: bool = False

    def with_options(self, options: Mapping[str, str]) -> HookSettings:
        """The per-migration options (``hook_*``) over these settings."""
        targets = dict(self.targets)
        for name in HOOKS:
            key = f"hook_{name}"
            if key in options:
                targets[name] = check_target(key, options[key])
                if targets[name] and not is_url(options[key].strip()) and not self.allow_option_commands:
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
        targets = {str(name): value if isinstance(value, str) else tuple(str(t) for t in value)
                   for name, value in dict(data.get("targets") or {}).items()}
        return cls(targets, float(data.get("timeout", 30.0)),
                   float(data.get("retry_interval", 10.0)), bool(data.get("allow_option_commands", False)))
