"""Configuration: one validated, frozen snapshot of every setting of ``tidegate serve``.

Four sources, lowest to highest precedence: built-in defaults, a TOML file
(``--config`` or ``TIDEGATE_CONFIG``), ``TIDEGATE_*`` environment variables and
command-line flags.  Each source is first turned into the same raw nested
shape (the TOML file's shape), the layers are merged, and one validator turns
the result into frozen dataclasses.  Scalar settings override key by key; the
lists (``backends``, ``users``) are replaced as a whole by a higher source.

Every problem raises :class:`ConfigError` whose message starts with the
offending key (``backends[1].dsn: port must be 1..65535, got 99999``) and says
which source set it.  Unknown keys are errors, with a suggestion.  Secrets
(passwords, hashes) never appear in messages or in ``repr``.

This module owns the meaning of every setting; nothing else reads the
environment or the file.  ``docs/configuration.md`` documents it key by key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NoReturn, cast
from urllib.parse import unquote, urlsplit

from proxy.routing import RuleError, RuleSpec, compile_rules, make_spec

__all__ = [
    "AdminConfig",
    "BackendConfig",
    "BackpressureConfig",
    "ClientTLSConfig",
    "Config",
    "ConfigError",
    "EventsConfig",
    "HooksConfig",
    "Limits",
    "RoutingConfig",
    "TLSConfig",
    "UserConfig",
    "build_arg_parser",
    "load_config",
    "load_config_from_args",
    "parse_dsn",
]

Role = Literal["primary", "replica"]
Address = tuple[str, int]

DEFAULT_MYSQL_PORT = 3306


class ConfigError(Exception):
    """Invalid configuration.  ``key`` is the dotted path of the offending setting, if any."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TLSConfig:
    """TLS towards one backend.  All fields unset still means TLS, with the system CAs."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: bool = True  # verify the certificate chain (``ca`` or system CAs) and the host name
    server_name: str | None = None  # SNI and the name to verify; defaults to the backend host


@dataclass(frozen=True)
class BackendConfig:
    name: str
    host: str
    port: int = DEFAULT_MYSQL_PORT
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    role: Role = "primary"
    tls: TLSConfig | None = None
    database: str | None = None


@dataclass(frozen=True)
class UserConfig:
    """A client account the proxy authenticates itself.  Exactly one of the secrets is set."""

    name: str
    password: str | None = field(default=None, repr=False)
    # MySQL native form: '*' + 40 upper-case hex digits (SHA1(SHA1(password))).
    password_hash: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Limits:
    max_client_connections: int = 1000
    max_backend_connections: int = 500
    backend_queue_size: int = 1000
    backend_queue_timeout: float = 5.0
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 28800.0
    max_allowed_packet: int = 64 * 1024 * 1024
    shutdown_grace: float = 5.0


@dataclass(frozen=True)
class ClientTLSConfig:
    """TLS offered to clients (``SSLRequest`` upgrade)."""

    cert: str
    key: str
    ca: str | None = None  # when set, client certificates are requested and verified against it
    required: bool = False  # refuse clients that do not upgrade to TLS


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = ("127.0.0.1", 6032)
    user: str = "admin"
    password: str | None = field(default=None, repr=False)
    allow_remote: bool = False


@dataclass(frozen=True)
class RoutingConfig:
    """Read/write split and replica health (``[routing]``)."""

    #: reads outside transactions go to a healthy replica
    read_write_split: bool = False
    #: a replica further behind than this gets no reads until it catches up
    max_replica_lag: float = 1.0
    lag_probe_interval: float = 0.5
    #: after a write, the session's reads stay on the primary this long (0: off)
    read_your_writes: float = 0.0
    #: statements waiting to be mirrored; more are dropped (and counted)
    mirror_queue: int = 1000
    #: follow the rule set published with APPLY RULES TO FLEET (false: this sidecar keeps its own)
    fleet_rules: bool = True


@dataclass(frozen=True)
class BackpressureConfig:
    """Lag backpressure (``[backpressure]``): writes wait, then get error 1637."""

    #: replica lag above which writes are held back (None: off)
    max_replica_lag: float | None = None
    #: a running migration's binlog lag above which writes are held back (None: off)
    max_migration_lag: float | None = None
    #: how long a write waits for the lag to recover before it is refused
    max_wait: float = 1.0
    #: the retry-after hint in the error message
    retry_after: float = 0.5
    #: only writes to these schema.table names (replica lag); empty: every write
    tables: tuple[str, ...] = ()
    #: "table": migration lag holds back writes to the migrating table only; "all": every write
    migration_scope: Literal["table", "all"] = "table"
    #: comment tag or connection attribute naming a statement's priority class
    priority_tag: str = "priority"
    #: class → factor on the lag limits (below 1: shed earlier; above 1: later)
    priorities: tuple[tuple[str, float], ...] = (("batch", 0.5), ("interactive", 2.0))


@dataclass(frozen=True)
class EventsConfig:
    """The event log (``[events]``): migration, hold and traced-statement events."""

    #: "" (the default): kept for the admin port only; "-": stderr; else a file, appended to
    file: str = ""
    #: events the admin port's ``events`` table keeps
    keep: int = 1000
    #: comment tags that carry a statement's trace id (sqlcommenter's ``traceparent``, or your own)
    trace_tags: tuple[str, ...] = ("traceparent",)


@dataclass(frozen=True)
class HooksConfig:
    """Lifecycle hooks of every migration (``[hooks]``): a command or an http(s) URL each."""

    startup: str = ""
    row_copy_complete: str = ""
    #: may veto: while it fails, the migration stays postponed (retried every retry_interval)
    before_cut_over: str = ""
    after_cut_over: str = ""
    success: str = ""
    failure: str = ""
    timeout: float = 30.0
    retry_interval: float = 10.0
    #: migration options may name commands, not only URLs (they run a shell on this sidecar)
    allow_option_commands: bool = False


@dataclass(frozen=True)
class Config:
    listen: Address = ("127.0.0.1", 6033)
    http_listen: Address = ("127.0.0.1", 9104)
    backends: tuple[BackendConfig, ...] = ()
    users: tuple[UserConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    client_tls: ClientTLSConfig | None = None
    admin: AdminConfig = field(default_factory=AdminConfig)
    log_level: str = "info"
    load_users_from_backend: bool = True
    #: run migrations requested through any sidecar and join cut-over holds
    #: (needs the service account); off for a proxy that must never write state
    migrations_enabled: bool = True
    #: schema on the primary for migration state and sidecar coordination
    state_schema: str = "_tidegate"
    events: EventsConfig = field(default_factory=EventsConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    backpressure: BackpressureConfig = field(default_factory=BackpressureConfig)
    #: routing rules from the file (the admin port changes them at run time)
    rules: tuple[RuleSpec, ...] = ()

    @property
    def primary(self) -> BackendConfig:
        primaries = [backend for backend in self.backends if backend.role == "primary"]
        if len(primaries) != 1:
            raise ConfigError(
                f"backends: exactly one primary is required, found {len(primaries)}",
                key="backends",
            )
        return primaries[0]

    @property
    def replicas(self) -> tuple[BackendConfig, ...]:
        return tuple(backend for backend in self.backends if backend.role == "replica")

    @property
    def service_account(self) -> tuple[str, str] | None:
        """The primary's credentials, used to load users and run admin work; None if not given."""
        primary = self.primary
        if primary.user is None:
            return None
        return (primary.user, primary.password or "")

    def backend(self, name: str) -> BackendConfig:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)

    def redacted(self) -> dict[str, object]:
        """A JSON-serialisable view with every secret replaced by ``"***"`` (for /status, logs)."""

        def scrub(value: object, name: str = "") -> object:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                return {
                    item.name: scrub(getattr(value, item.name), item.name)
                    for item in dataclasses.fields(value)
                }
            if name in _SECRET_FIELDS:
                return None if value is None else "***"
            if name in ("listen", "http_listen") and isinstance(value, tuple):
                return _format_address(cast(Address, value))
            if isinstance(value, tuple):
                return [scrub(item) for item in value]
            return value

        return cast(dict[str, object], scrub(self))


_SECRET_FIELDS = frozenset({"password", "password_hash"})


# --------------------------------------------------------------------------- raw layers
#
# A layer is a nested dict in the TOML file's shape plus, per dotted key, a
# description of where it came from, so that errors can say "set by
# TIDEGATE_LIMITS_IDLE_TIMEOUT" or "set by /etc/tidegate.toml".

Raw = dict[str, object]


@dataclass
class _Layer:
    values: Raw = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def set(self, path: str, value: object, origin: str) -> None:
        section, _, leaf = path.rpartition(".")
        target = self.values
        if section:
            target = cast(Raw, target.setdefault(section, {}))
        target[leaf] = value
        self.origins[path] = origin


def _merge(layers: Iterable[_Layer]) -> _Layer:
    merged = _Layer()
    for layer in layers:
        for key, value in layer.values.items():
            current = merged.values.get(key)
            if isinstance(value, dict) and isinstance(current, dict):
                current.update(value)
            elif isinstance(value, dict):
                merged.values[key] = dict(value)
            else:
                merged.values[key] = value
            if key in _LIST_KEYS:
                # A replaced list takes its origins with it.
                for origin_key in [k for k in merged.origins if _under(k, key)]:
                    del merged.origins[origin_key]
        merged.origins.update(layer.origins)
    return merged


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))


class _Context:
    """Error construction with the origin of each key."""

    def __init__(self, origins: Mapping[str, str]) -> None:
        self._origins = sorted(origins.items(), key=lambda item: -len(item[0]))

    def origin(self, key: str) -> str | None:
        for prefix, origin in self._origins:
            if _under(key, prefix):
                return origin
        return None

    def error(self, key: str, problem: str) -> ConfigError:
        origin = self.origin(key)
        suffix = f" (set by {origin})" if origin else ""
        return ConfigError(f"{key}: {problem}{suffix}", key=key)

    def unknown(self, key: str, name: str, known: Iterable[str]) -> ConfigError:
        prefix = key.rpartition(".")[0]
        origin = self.origin(key)
        close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        hint = f" (did you mean '{_join(prefix, close[0])}'?)" if close else ""
        where = f" in {origin}" if origin else ""
        return ConfigError(f"unknown key '{key}'{hint}{where}", key=key)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


# --------------------------------------------------------------------------- scalar parsers

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*$")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_SIZE = re.compile(r"^\s*([0-9]+)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _string(ctx: _Context, key: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ctx.error(key, f"expected a string, got {_show(value)}")
    if not empty and not value:
        raise ctx.error(key, "must not be empty")
    if "\x00" in value:
        raise ctx.error(key, "must not contain NUL characters")
    return value


def _secret(ctx: _Context, key: str, value: object) -> str:
    if not isinstance(value, str):
        raise ctx.error(key, "expected a string")
    return value


def _boolean(ctx: _Context, key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise ctx.error(key, f"expected true or false, got {_show(value)}")


def _integer(ctx: _Context, key: str, value: object, low: int, high: int) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    if number is None:
        raise ctx.error(key, f"expected an integer, got {_show(value)}")
    if not low <= number <= high:
        raise ctx.error(key, f"must be {low}..{high}, got {number}")
    return number


def _size(ctx: _Context, key: str, value: object, low: int, high: int) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and (match := _SIZE.match(value)):
        number = int(match[1]) * _SIZE_UNITS[match[2].lower()]
    if number is None:
        raise ctx.error(
            key, f'expected a size in bytes (e.g. 67108864 or "64M"), got {_show(value)}'
        )
    if not low <= number <= high:
        raise ctx.error(key, f"must be {low}..{high} bytes, got {number}")
    return number


def _seconds(ctx: _Context, key: str, value: object, *, zero: bool) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        number = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if number is None or math.isnan(number):
        raise ctx.error(key, f"expected a number of seconds, got {_show(value)}")
    if math.isinf(number) or number > 366 * 86400:
        raise ctx.error(key, f"must be at most one year, got {_show(value)}")
    if number < 0 or (number == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ctx.error(key, f"must be {bound} seconds, got {_show(value)}")
    return number


def _split_host_port(text: str) -> tuple[str, str] | None:
    """``host:port`` or ``[v6]:port`` → (host, port text); None if it has no such shape."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon or ":" in host:
        return None
    return host, port


def _port(ctx: _Context, key: str, text: str, low: int) -> int:
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise ctx.error(
            key, f"port must be {low}..65535, got {_show(text) if not text.isdigit() else text}"
        )
    return int(text)


def _address(ctx: _Context, key: str, value: object) -> Address:
    text = _string(ctx, key, value)
    parts = _split_host_port(text.strip())
    if parts is None or not parts[0]:
        raise ctx.error(
            key, f'expected HOST:PORT (e.g. "127.0.0.1:6033" or "[::1]:6033"), got {_show(text)}'
        )
    host, port = parts
    return host, _port(ctx, key, port, low=0)


def _format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file(ctx: _Context, key: str, value: object) -> str:
    text = _string(ctx, key, value)
    path = Path(text).expanduser()
    if not path.exists():
        raise ctx.error(key, f"file not found: {text}")
    if not path.is_file():
        raise ctx.error(key, f"not a regular file: {text}")
    if not os.access(path, os.R_OK):
        raise ctx.error(key, f"file is not readable: {text}")
    return str(path.absolute())


def _table(ctx: _Context, key: str, value: object, known: Iterable[str]) -> Raw:
    if not isinstance(value, dict):
        raise ctx.error(key, f"expected a table, got {_show(value)}")
    known = tuple(known)
    for name in value:
        if name not in known:
            raise ctx.unknown(_join(key, name), name, known)
    return cast(Raw, value)


def _list(ctx: _Context, key: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise ctx.error(key, f"expected an array of tables ([[{key}]]), got {_show(value)}")
    return value


# --------------------------------------------------------------------------- DSN


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_DSN_PARAMETERS = (
    "role",
    "name",
    "ssl",
    "ssl-ca",
    "ssl-cert",
    "ssl-key",
    "ssl-verify",
    "ssl-server-name",
)


@dataclass
class _DsnParts:
    host: str
    port: int
    user: str | None
    password: str | None
    database: str | None
    role: Role | None
    name: str | None
    tls: TLSConfig | None


def _role(ctx: _Context, key: str, value: object) -> Role:
    if value not in ("primary", "replica"):
        raise ctx.error(key, f'expected "primary" or "replica", got {_show(value)}')
    return value


def _backend_name(ctx: _Context, key: str, value: object) -> str:
    text = _string(ctx, key, value)
    if not _NAME.match(text):
        raise ctx.error(
            key, f"expected letters, digits, '_', '.' or '-' (at most 64), got {_show(text)}"
        )
    return text


def _tls(ctx: _Context, raw: Mapping[str, object], label: Callable[[str], str]) -> TLSConfig:
    """TLS settings from a table or from a DSN's ssl-* options; ``label`` names each field."""

    def path(name: str) -> str | None:
        return _file(ctx, label(name), raw[name]) if raw.get(name) is not None else None

    ca, cert, private_key = path("ca"), path("cert"), path("key")
    if (cert is None) != (private_key is None):
        raise ctx.error(
            label("key" if private_key is None else "cert"), "cert and key must be given together"
        )
    verify = _boolean(ctx, label("verify"), raw["verify"]) if "verify" in raw else True
    server_name = (
        _string(ctx, label("server_name"), raw["server_name"])
        if raw.get("server_name") is not None
        else None
    )
    return TLSConfig(ca=ca, cert=cert, key=private_key, verify=verify, server_name=server_name)


def _parse_dsn_parts(ctx: _Context, key: str, dsn: object) -> _DsnParts:
    text = _string(ctx, key, dsn)
    if "://" not in text:
        raise ctx.error(key, "expected mysql://[USER[:PASSWORD]@]HOST[:PORT][/DATABASE][?OPTIONS]")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unbalanced '[' in the host
        raise ctx.error(key, f"not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("mysql", "mariadb"):
        raise ctx.error(key, f"scheme must be mysql://, got {_show(parts.scheme + '://')}")
    if parts.fragment:
        raise ctx.error(key, "unexpected '#' fragment")

    userinfo, at, hostport = parts.netloc.rpartition("@")
    user: str | None = None
    password: str | None = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user) or None
        password = unquote(raw_password) if colon else None
        if user is None:
            raise ctx.error(key, "a password was given without a user")

    if not hostport:
        raise ctx.error(key, "host is missing")
    split = _split_host_port(hostport)
    if split is None:
        if hostport.startswith("[") and hostport.endswith("]"):
            host, port = hostport[1:-1], DEFAULT_MYSQL_PORT
        elif hostport.startswith("[") or ":" in hostport:
            raise ctx.error(key, f"cannot read HOST[:PORT] from {_show(hostport)}")
        else:
            host, port = hostport, DEFAULT_MYSQL_PORT
    else:
        host = split[0]
        port = _port(ctx, key, split[1], low=1)
    if not host:
        raise ctx.error(key, "host is missing")

    path = parts.path.lstrip("/")
    if "/" in path:
        raise ctx.error(key, f"expected at most one path segment (the database), got {_show(path)}")
    database = unquote(path) or None

    options: dict[str, str] = {}
    for item in parts.query.split("&") if parts.query else ():
        raw_name, _, raw_value = item.partition("=")
        name = unquote(raw_name).replace("_", "-").lower()
        if name not in _DSN_PARAMETERS:
            close = difflib.get_close_matches(name, _DSN_PARAMETERS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ctx.error(key, f"unknown option '{name}'{hint}")
        if name in options:
            raise ctx.error(key, f"option '{name}' given twice")
        options[name] = unquote(raw_value)

    role = _role(ctx, f"{key} (role)", options["role"]) if "role" in options else None
    backend_name = (
        _backend_name(ctx, f"{key} (name)", options["name"]) if "name" in options else None
    )

    tls: TLSConfig | None = None
    tls_options = {
        name.removeprefix("ssl-").replace("-", "_"): value
        for name, value in options.items()
        if name.startswith("ssl-")
    }
    enabled = _boolean(ctx, f"{key} (ssl)", options["ssl"]) if "ssl" in options else None
    if enabled is False and tls_options:
        raise ctx.error(key, "ssl=false contradicts the other ssl-* options")
    if enabled or tls_options:
        tls = _tls(ctx, tls_options, lambda name: f"{key} (ssl-{name.replace('_', '-')})")
    return _DsnParts(host, port, user, password, database, role, backend_name, tls)


def parse_dsn(
    dsn: str,
    *,
    key: str,
    default_role: Role = "primary",
    default_name: str | None = None,
) -> BackendConfig:
    """Read ``mysql://user:pass@host:port/db?role=replica&name=r1&ssl-ca=PATH…``.

    User and password are percent-decoded; the port defaults to 3306; ``role``
    defaults to ``default_role`` and ``name`` to ``default_name`` or the role
    ("primary", "replica1").  ``key`` names the setting in error messages.
    """
    parts = _parse_dsn_parts(_Context({}), key, dsn)
    role = parts.role or default_role
    name = parts.name or default_name or ("primary" if role == "primary" else "replica1")
    return BackendConfig(
        name=name,
        host=parts.host,
        port=parts.port,
        user=parts.user,
        password=parts.password,
        role=role,
        tls=parts.tls,
        database=parts.database,
    )


# --------------------------------------------------------------------------- validation

_TOP_KEYS = (
    "listen",
    "http_listen",
    "log_level",
    "load_users_from_backend",
    "migrations_enabled",
    "state_schema",
    "backends",
    "users",
    "limits",
    "client_tls",
    "admin",
    "events",
    "hooks",
    "routing",
    "backpressure",
    "rules",
)
_LIST_KEYS = ("backends", "users", "rules")
_ROUTING_KEYS = tuple(item.name for item in dataclasses.fields(RoutingConfig))
_BACKPRESSURE_KEYS = tuple(item.name for item in dataclasses.fields(BackpressureConfig))
_BACKEND_KEYS = ("name", "dsn", "host", "port", "user", "password", "database", "role", "tls")
_BACKEND_ADDRESS_KEYS = ("host", "port", "user", "password", "database")
_TLS_KEYS = ("ca", "cert", "key", "verify", "server_name")
_USER_KEYS = ("name", "password", "password_hash")
_CLIENT_TLS_KEYS = ("cert", "key", "ca", "required")
_ADMIN_KEYS = ("listen", "user", "password", "allow_remote")
_EVENTS_KEYS = tuple(item.name for item in dataclasses.fields(EventsConfig))
_HOOKS_KEYS = tuple(item.name for item in dataclasses.fields(HooksConfig))
_TAG_NAME = re.compile(r"^[A-Za-z_][\w.-]*$")
_LIMIT_KEYS = tuple(item.name for item in dataclasses.fields(Limits))
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_PASSWORD_HASH = re.compile(r"^\*[0-9A-Fa-f]{40}$")

# (kind, lowest, highest) per limit; kind "seconds" uses lowest 0 to mean "zero allowed".
_LIMIT_RULES: dict[str, tuple[str, int, int]] = {
    "max_client_connections": ("int", 1, 1_000_000),
    "max_backend_connections": ("int", 1, 1_000_000),
    "backend_queue_size": ("int", 0, 1_000_000),
    "backend_queue_timeout": ("seconds", 0, 0),
    "connect_timeout": ("seconds", 1, 0),
    "handshake_timeout": ("seconds", 1, 0),
    "idle_timeout": ("seconds", 1, 0),
    "max_allowed_packet": ("size", 1024, 1024**3),
    "shutdown_grace": ("seconds", 0, 0),
}
assert set(_LIMIT_RULES) == set(_LIMIT_KEYS)


def _validate(raw: Raw, ctx: _Context) -> Config:
    _table(ctx, "", raw, _TOP_KEYS)
    defaults = Config()

    listen = _address(ctx, "listen", raw["listen"]) if "listen" in raw else defaults.listen
    http_listen = (
        _address(ctx, "http_listen", raw["http_listen"])
        if "http_listen" in raw
        else defaults.http_listen
    )
    log_level = defaults.log_level
    if "log_level" in raw:
        log_level = _string(ctx, "log_level", raw["log_level"]).strip().lower()
        log_level = "warning" if log_level == "warn" else log_level
        if log_level not in _LOG_LEVELS:
            raise ctx.error(
                "log_level",
                f"expected one of {', '.join(_LOG_LEVELS)}, got {_show(raw['log_level'])}",
            )
    load_users = (
        _boolean(ctx, "load_users_from_backend", raw["load_users_from_backend"])
        if "load_users_from_backend" in raw
        else defaults.load_users_from_backend
    )
    migrations_enabled = (
        _boolean(ctx, "migrations_enabled", raw["migrations_enabled"])
        if "migrations_enabled" in raw
        else defaults.migrations_enabled
    )
    state_schema = defaults.state_schema
    if "state_schema" in raw:
        state_schema = _string(ctx, "state_schema", raw["state_schema"])
        if len(state_schema) > 64 or "`" in state_schema or "\x00" in state_schema:
            raise ctx.error("state_schema", f"not a valid schema name: {_show(raw['state_schema'])}")

    backends = _backends(ctx, raw.get("backends"))
    users = _users(ctx, raw.get("users", []))
    limits = _limits(ctx, raw.get("limits", {}))
    client_tls = _client_tls(ctx, raw["client_tls"]) if "client_tls" in raw else None
    admin = _admin(ctx, raw.get("admin", {}))
    events = _events(ctx, raw.get("events", {}))
    hooks = _hooks(ctx, raw.get("hooks", {}))
    routing = _routing(ctx, raw.get("routing", {}))
    backpressure = _backpressure(ctx, raw.get("backpressure", {}))
    rules = _rules(ctx, raw.get("rules", []), backends)

    config = Config(
        listen=listen,
        http_listen=http_listen,
        backends=backends,
        users=users,
        limits=limits,
        client_tls=client_tls,
        admin=admin,
        log_level=log_level,
        load_users_from_backend=load_users,
        migrations_enabled=migrations_enabled,
        state_schema=state_schema,
        events=events,
        hooks=hooks,
        routing=routing,
        backpressure=backpressure,
        rules=rules,
    )
    _check_listeners(ctx, config)
    _check_replica_accounts(ctx, config)
    if not users and (config.service_account is None or not load_users):
        why = (
            "load_users_from_backend is false"
            if config.service_account is not None
            else "the primary has no user to load them with"
        )
        raise ctx.error(
            "users",
            f"no client users are configured and {why}; add [[users]] (or --user) or "
            "give the primary's DSN a service account (mysql://USER:PASSWORD@HOST)",
        )
    return config


def _backends(ctx: _Context, value: object) -> tuple[BackendConfig, ...]:
    if value is None:
        raise ctx.error(
            "backends",
            "at least one backend is required (--backend mysql://USER:PASSWORD@HOST:PORT, "
            "TIDEGATE_BACKEND or [[backends]])",
        )
    entries = _list(ctx, "backends", value)
    if not entries:
        raise ctx.error("backends", "at least one backend is required")

    parsed: list[tuple[str, _DsnParts]] = []
    for index, entry in enumerate(entries):
        key = f"backends[{index}]"
        table = _table(ctx, key, entry, _BACKEND_KEYS)
        if "dsn" in table:
            clash = [name for name in _BACKEND_ADDRESS_KEYS if name in table]
            if clash:
                raise ctx.error(
                    f"{key}.{clash[0]}",
                    "give either dsn or host/port/user/password/database, not both",
                )
            parts = _parse_dsn_parts(ctx, f"{key}.dsn", table["dsn"])
        elif "host" in table:
            parts = _DsnParts(
                host=_string(ctx, f"{key}.host", table["host"]),
                port=(
                    _integer(ctx, f"{key}.port", table["port"], 1, 65535)
                    if "port" in table
                    else DEFAULT_MYSQL_PORT
                ),
                user=_string(ctx, f"{key}.user", table["user"]) if "user" in table else None,
                password=_secret(ctx, f"{key}.password", table["password"])
                if "password" in table
                else None,
                database=_string(ctx, f"{key}.database", table["database"])
                if "database" in table
                else None,
                role=None,
                name=None,
                tls=None,
            )
            if parts.password is not None and parts.user is None:
                raise ctx.error(f"{key}.password", "a password was given without a user")
        else:
            raise ctx.error(key, "needs a dsn (or a host)")

        for attribute, parse in (("role", _role), ("name", _backend_name)):
            if attribute in table:
                explicit = parse(ctx, f"{key}.{attribute}", table[attribute])
                in_dsn = getattr(parts, attribute)
                if in_dsn is not None and in_dsn != explicit:
                    raise ctx.error(
                        f"{key}.{attribute}",
                        f"{_show(explicit)} contradicts {attribute}={in_dsn} in the dsn",
                    )
                setattr(parts, attribute, explicit)
        if "tls" in table:
            if parts.tls is not None:
                raise ctx.error(
                    f"{key}.tls", "TLS is set both by ssl-* options in the dsn and here; use one"
                )
            tls_table = _table(ctx, f"{key}.tls", table["tls"], _TLS_KEYS)
            parts.tls = _tls(ctx, tls_table, functools.partial(_join, f"{key}.tls"))
        parsed.append((key, parts))

    # The first backend without a role is the primary unless one names itself so.
    has_explicit_primary = any(parts.role == "primary" for _, parts in parsed)
    for _, parts in parsed:
        if parts.role is None:
            parts.role = "replica" if has_explicit_primary else "primary"
            has_explicit_primary = True
    primaries = [key for key, parts in parsed if parts.role == "primary"]
    if len(primaries) > 1:
        raise ctx.error(
            primaries[1], f"more than one primary ({', '.join(primaries)}); exactly one is allowed"
        )
    if not primaries:
        raise ctx.error("backends", 'no primary: one backend must have role "primary"')

    backends: list[BackendConfig] = []
    used: dict[str, str] = {}
    replica_number = 0
    for key, parts in parsed:
        role = cast(Role, parts.role)
        if role == "replica":
            replica_number += 1
        name = parts.name
        if name is None:
            name = "primary" if role == "primary" else f"replica{replica_number}"
            while name in used or any(p.name == name for _, p in parsed):
                name += "_"
        if name in used:
            raise ctx.error(
                f"{key}.name", f"duplicate backend name {_show(name)} (also {used[name]})"
            )
        used[name] = key
        backends.append(
            BackendConfig(
                name=name,
                host=parts.host,
                port=parts.port,
                user=parts.user,
                password=parts.password,
                role=role,
                tls=parts.tls,
                database=parts.database,
            )
        )
    return tuple(backends)


def _users(ctx: _Context, value: object) -> tuple[UserConfig, ...]:
    users: list[UserConfig] = []
    seen: dict[str, str] = {}
    for index, entry in enumerate(_list(ctx, "users", value)):
        key = f"users[{index}]"
        table = _table(ctx, key, entry, _USER_KEYS)
        if "name" not in table:
            raise ctx.error(f"{key}.name", "required")
        name = _string(ctx, f"{key}.name", table["name"])
        if len(name) > 80:
            raise ctx.error(f"{key}.name", f"at most 80 characters, got {len(name)}")
        if name in seen:
            raise ctx.error(f"{key}.name", f"duplicate user {_show(name)} (also {seen[name]})")
        seen[name] = key
        has_password, has_hash = "password" in table, "password_hash" in table
        if has_password == has_hash:
            raise ctx.error(key, "give exactly one of password and password_hash")
        password = password_hash = None
        if has_password:
            password = _secret(ctx, f"{key}.password", table["password"])
        else:
            password_hash = _secret(ctx, f"{key}.password_hash", table["password_hash"])
            if not _PASSWORD_HASH.match(password_hash):
                raise ctx.error(
                    f"{key}.password_hash",
                    "expected MySQL's native form: '*' followed by 40 hex digits "
                    "(SELECT PASSWORD('secret') or the authentication_string column)",
                )
            password_hash = password_hash.upper()
        users.append(UserConfig(name=name, password=password, password_hash=password_hash))
    return tuple(users)


def _limits(ctx: _Context, value: object) -> Limits:
    table = _table(ctx, "limits", value, _LIMIT_KEYS)
    values: dict[str, int | float] = {}
    for name, raw in table.items():
        kind, low, high = _LIMIT_RULES[name]
        key = f"limits.{name}"
        if kind == "int":
            values[name] = _integer(ctx, key, raw, low, high)
        elif kind == "size":
            values[name] = _size(ctx, key, raw, low, high)
        else:
            values[name] = _seconds(ctx, key, raw, zero=low == 0)
    return Limits(**values)  # type: ignore[arg-type]


def _client_tls(ctx: _Context, value: object) -> ClientTLSConfig:
    table = _table(ctx, "client_tls", value, _CLIENT_TLS_KEYS)
    for required in ("cert", "key"):
        if table.get(required) is None:
            raise ctx.error(f"client_tls.{required}", "required when client_tls is configured")
    return ClientTLSConfig(
        cert=_file(ctx, "client_tls.cert", table["cert"]),
        key=_file(ctx, "client_tls.key", table["key"]),
        ca=_file(ctx, "client_tls.ca", table["ca"]) if table.get("ca") is not None else None,
        required=_boolean(ctx, "client_tls.required", table["required"])
        if "required" in table
        else False,
    )


def _admin(ctx: _Context, value: object) -> AdminConfig:
    table = _table(ctx, "admin", value, _ADMIN_KEYS)
    defaults = AdminConfig()
    listen = (
        _address(ctx, "admin.listen", table["listen"]) if "listen" in table else defaults.listen
    )
    user = _string(ctx, "admin.user", table["user"]) if "user" in table else defaults.user
    password = _secret(ctx, "admin.password", table["password"]) if "password" in table else None
    allow_remote = (
        _boolean(ctx, "admin.allow_remote", table["allow_remote"])
        if "allow_remote" in table
        else defaults.allow_remote
    )
    if not allow_remote and not _is_loopback(listen[0]):
        raise ctx.error(
            "admin.listen",
            f"{listen[0]} is not a loopback address; set admin.allow_remote = true "
            "(and admin.password) to expose the admin port",
        )
    if allow_remote and not password:
        raise ctx.error("admin.password", "required when admin.allow_remote is true")
    return AdminConfig(listen=listen, user=user, password=password, allow_remote=allow_remote)


def _routing(ctx: _Context, value: object) -> RoutingConfig:
    table = _table(ctx, "routing", value, _ROUTING_KEYS)
    defaults = RoutingConfig()
    values: dict[str, object] = {}
    for name, raw in table.items():
        key = f"routing.{name}"
        if name in ("read_write_split", "fleet_rules"):
            values[name] = _boolean(ctx, key, raw)
        elif name == "mirror_queue":
            values[name] = _integer(ctx, key, raw, 1, 1_000_000)
        else:
            values[name] = _seconds(ctx, key, raw, zero=name == "read_your_writes")
    routing = dataclasses.replace(defaults, **values)  # type: ignore[arg-type]
    return routing


def _backpressure(ctx: _Context, value: object) -> BackpressureConfig:
    table = _table(ctx, "backpressure", value, _BACKPRESSURE_KEYS)
    values: dict[str, object] = {}
    for name, raw in table.items():
        key = f"backpressure.{name}"
        if name in ("max_replica_lag", "max_migration_lag", "max_wait", "retry_after"):
            values[name] = _seconds(ctx, key, raw, zero=name == "max_wait")
        elif name == "tables":
            items = raw if isinstance(raw, list) else None
            if items is None:
                raise ctx.error(key, f'expected a list of "schema.table" names, got {_show(raw)}')
            names = []
            for index, item in enumerate(items):
                text = _string(ctx, f"{key}[{index}]", item).strip().lower()
                if text.count(".") != 1 or text.startswith(".") or text.endswith("."):
                    raise ctx.error(f"{key}[{index}]", f'expected "schema.table", got {_show(item)}')
                names.append(text)
            values[name] = tuple(names)
        elif name == "migration_scope":
            if raw not in ("table", "all"):
                raise ctx.error(key, f'expected "table" or "all", got {_show(raw)}')
            values[name] = raw
        elif name == "priority_tag":
            values[name] = _string(ctx, key, raw).strip().lower()
        else:  # priorities
            if not isinstance(raw, dict):
                raise ctx.error(key, f"expected a table of class = factor (e.g. {{ batch = 0.5 }}), got {_show(raw)}")
            factors = []
            for class_name, factor in raw.items():
                if not isinstance(factor, int | float) or isinstance(factor, bool) or not 0 < factor <= 100:
                    raise ctx.error(f"{key}.{class_name}", f"expected a factor > 0 (e.g. 0.5), got {_show(factor)}")
                if class_name == "default":
                    raise ctx.error(f"{key}.{class_name}", "'default' is the class of untagged statements (factor 1)")
                factors.append((str(class_name), float(factor)))
            values[name] = tuple(factors)
    return dataclasses.replace(BackpressureConfig(), **values)  # type: ignore[arg-type]


def _rules(ctx: _Context, value: object, backends: tuple[BackendConfig, ...]) -> tuple[RuleSpec, ...]:
    specs: list[RuleSpec] = []
    keys: dict[int, str] = {}
    roles = {backend.name: backend.role for backend in backends}
    for index, entry in enumerate(_list(ctx, "rules", value)):
        key = f"rules[{index}]"
        if not isinstance(entry, dict):
            raise ctx.error(key, f"expected a table ([[rules]]), got {_show(entry)}")
        try:
            spec = make_spec(entry)
            compile_rules([spec], roles)
        except RuleError as error:
            raise ctx.error(f"{key}.{error.field}", error.problem) from None
        if spec.id in keys:
            raise ctx.error(f"{key}.id", f"duplicate rule id {spec.id} (also {keys[spec.id]})")
        keys[spec.id] = key
        specs.append(spec)
    return tuple(specs)


def _check_replica_accounts(ctx: _Context, config: Config) -> None:
    """Replica lag is probed with the replica's own account, else the service account."""
    if not config.routing.read_write_split and config.backpressure.max_replica_lag is None:
        return
    if not config.replicas:
        key = "routing.read_write_split" if config.routing.read_write_split else "backpressure.max_replica_lag"
        raise ctx.error(key, 'needs at least one backend with role "replica"')
    if config.service_account is not None:
        return
    for index, backend in enumerate(config.backends):
        if backend.role == "replica" and backend.user is None:
            raise ctx.error(
                f"backends[{index}]",
                f"replica {backend.name} has no account to probe its lag with: give it a user "
                "(mysql://USER:PASSWORD@HOST) or give the primary a service account",
            )


def _events(ctx: _Context, value: object) -> EventsConfig:
    table = _table(ctx, "events", value, _EVENTS_KEYS)
    defaults = EventsConfig()
    file = defaults.file
    if "file" in table:
        file = _string(ctx, "events.file", table["file"], empty=True).strip()
        if file not in ("", "-"):
            parent = Path(file).expanduser().parent
            if Path(file).is_dir():
                raise ctx.error("events.file", f"{file} is a directory; name a file (or - for stderr)")
            if not parent.is_dir():
                raise ctx.error("events.file", f"directory {parent} does not exist")
    keep = _integer(ctx, "events.keep", table["keep"], 1, 1_000_000) if "keep" in table else defaults.keep
    trace_tags = defaults.trace_tags
    if "trace_tags" in table:
        raw = table["trace_tags"]
        items = raw.split(",") if isinstance(raw, str) else raw if isinstance(raw, list) else None
        if items is None:
            raise ctx.error("events.trace_tags", f"expected a list of comment tag names, got {_show(raw)}")
        names = []
        for index, item in enumerate(items):
            name = _string(ctx, f"events.trace_tags[{index}]", item).strip().lower()
            if not _TAG_NAME.match(name):
                raise ctx.error(f"events.trace_tags[{index}]", f"not a comment tag name: {_show(item)}")
            names.append(name)
        trace_tags = tuple(dict.fromkeys(names))
    return EventsConfig(file=file, keep=keep, trace_tags=trace_tags)


def _hooks(ctx: _Context, value: object) -> HooksConfig:
    from proxy.hooks import HookError, check_target

    table = _table(ctx, "hooks", value, _HOOKS_KEYS)
    values: dict[str, object] = {}
    for name, raw in table.items():
        key = f"hooks.{name}"
        if name in ("timeout", "retry_interval"):
            values[name] = _seconds(ctx, key, raw, zero=False)
            continue
        if name == "allow_option_commands":
            values[name] = _boolean(ctx, key, raw)
            continue
        try:
            values[name] = check_target(key, _string(ctx, key, raw, empty=True))
        except HookError as error:
            raise ctx.error(key, str(error).removeprefix(f"{key}: ")) from None
    return dataclasses.replace(HooksConfig(), **values)  # type: ignore[arg-type]


def _check_listeners(ctx: _Context, config: Config) -> None:
    """Two of our listeners on one port would fail at bind time with a vaguer message."""
    wildcard = ("0.0.0.0", "::", "")
    seen: list[tuple[str, Address]] = []
    for key, (host, port) in (
        ("listen", config.listen),
        ("http_listen", config.http_listen),
        ("admin.listen", config.admin.listen),
    ):
        for other_key, (other_host, other_port) in seen:
            if (
                port != 0
                and port == other_port
                and (host == other_host or host in wildcard or other_host in wildcard)
            ):
                # Blame the setting someone wrote rather than a default.
                if ctx.origin(key) is None and ctx.origin(other_key) is not None:
                    key, other_key = other_key, key
                raise ctx.error(key, f"port {port} is also used by {other_key}")
        seen.append((key, (host, port)))


# --------------------------------------------------------------------------- sources


def _file_layer(path: str) -> _Layer:
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}", key="config") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}", key="config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}", key="config") from None
    return _Layer(values=values, origins={name: path for name in values})


_ENV_PREFIX = "TIDEGATE_"
_ENV_SCALARS: dict[str, str] = {
    "TIDEGATE_LISTEN": "listen",
    "TIDEGATE_HTTP_LISTEN": "http_listen",
    "TIDEGATE_LOG_LEVEL": "log_level",
    "TIDEGATE_LOAD_USERS_FROM_BACKEND": "load_users_from_backend",
    "TIDEGATE_MIGRATIONS_ENABLED": "migrations_enabled",
    "TIDEGATE_STATE_SCHEMA": "state_schema",
    **{f"TIDEGATE_ADMIN_{name.upper()}": f"admin.{name}" for name in _ADMIN_KEYS},
    **{f"TIDEGATE_CLIENT_TLS_{name.upper()}": f"client_tls.{name}" for name in _CLIENT_TLS_KEYS},
    **{f"TIDEGATE_LIMITS_{name.upper()}": f"limits.{name}" for name in _LIMIT_KEYS},
    **{f"TIDEGATE_EVENTS_{name.upper()}": f"events.{name}" for name in _EVENTS_KEYS},
    **{f"TIDEGATE_HOOKS_{name.upper()}": f"hooks.{name}" for name in _HOOKS_KEYS},
    "TIDEGATE_ROUTING_READ_WRITE_SPLIT": "routing.read_write_split",
    "TIDEGATE_ROUTING_MAX_REPLICA_LAG": "routing.max_replica_lag",
    "TIDEGATE_ROUTING_FLEET_RULES": "routing.fleet_rules",
}
_ENV_OTHER = ("TIDEGATE_CONFIG", "TIDEGATE_BACKEND")
_ENV_KNOWN = (*_ENV_SCALARS, *_ENV_OTHER)
# Families whose every member we own: an unknown name in them is a typo.
_ENV_OWNED_PREFIXES = ("TIDEGATE_ADMIN_", "TIDEGATE_CLIENT_TLS_", "TIDEGATE_LIMITS_", "TIDEGATE_EVENTS_",
                       "TIDEGATE_HOOKS_")


def _env_layer(env: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for name, value in sorted(env.items()):
        if not name.startswith(_ENV_PREFIX) or value == "":
            continue
        if name in _ENV_SCALARS:
            layer.set(_ENV_SCALARS[name], value, name)
        elif name == "TIDEGATE_BACKEND":
            dsns = [item.strip() for item in value.split(",") if item.strip()]
            layer.values["backends"] = [{"dsn": dsn} for dsn in dsns]
            layer.origins["backends"] = name
        elif name not in _ENV_OTHER:
            # Other components may use TIDEGATE_* too; only near-misses of ours are errors.
            close = difflib.get_close_matches(name, _ENV_KNOWN, n=1, cutoff=0.9)
            if name.startswith(_ENV_OWNED_PREFIXES) or close:
                close = close or difflib.get_close_matches(name, _ENV_KNOWN, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"unknown environment variable {name}{hint}", key=name)
    return layer


class _ArgumentParser(argparse.ArgumentParser):
    """Raises ConfigError instead of exiting, so callers report every config problem alike."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"command line: {message}", key="argv")


# flag → (dotted key, metavar, help)
_FLAG_SCALARS: dict[str, tuple[str, str, str]] = {
    "--listen": ("listen", "HOST:PORT", "MySQL listener for clients (default 127.0.0.1:6033)"),
    "--http-listen": ("http_listen", "HOST:PORT", "/metrics and health (default 127.0.0.1:9104)"),
    "--admin-listen": ("admin.listen", "HOST:PORT", "admin SQL port (default 127.0.0.1:6032)"),
    "--admin-user": ("admin.user", "NAME", "admin port user (default admin)"),
    "--log-level": ("log_level", "LEVEL", "debug, info, warning, error or critical"),
    "--state-schema": ("state_schema", "NAME", "schema for migration state and sidecar coordination (default _tidegate)"),
    "--events-file": ("events.file", "PATH", "event log as JSON lines: a file, or - for stderr (default: none)"),
    "--client-tls-cert": ("client_tls.cert", "PATH", "certificate offered to clients"),
    "--client-tls-key": ("client_tls.key", "PATH", "private key of --client-tls-cert"),
    "--client-tls-ca": ("client_tls.ca", "PATH", "CA to verify client certificates"),
    "--max-replica-lag": ("routing.max_replica_lag", "SECONDS", "no reads to a replica further behind (default 1)"),
    **{
        "--" + name.replace("_", "-"): (f"limits.{name}", metavar, help_text)
        for name, (metavar, help_text) in {
            "max_client_connections": ("N", "clients at once; more get error 1040 (default 1000)"),
            "max_backend_connections": (
                "N",
                "connections open to backends; more clients queue (default 500)",
            ),
            "backend_queue_size": ("N", "clients waiting for a backend connection (default 1000)"),
            "backend_queue_timeout": ("SECONDS", "longest such wait (default 5)"),
            "connect_timeout": ("SECONDS", "backend TCP connect + login (default 5)"),
            "handshake_timeout": ("SECONDS", "client handshake + login (default 10)"),
            "idle_timeout": ("SECONDS", "close idle client connections (default 28800)"),
            "max_allowed_packet": ("BYTES", "largest packet, e.g. 64M (default 64M)"),
            "shutdown_grace": ("SECONDS", "drain time on SIGTERM (default 5)"),
        }.items()
    },
}
assert {flag for flag in _FLAG_SCALARS if _FLAG_SCALARS[flag][0].startswith("limits.")} == {
    "--" + name.replace("_", "-") for name in _LIMIT_KEYS
}
_FLAG_BOOLEANS: dict[str, tuple[str, str]] = {
    "--admin-allow-remote": ("admin.allow_remote", "let the admin port listen off loopback"),
    "--client-tls-required": ("client_tls.required", "refuse clients that do not use TLS"),
    "--load-users-from-backend": (
        "load_users_from_backend",
        "load client users from the primary's mysql.user (default on)",
    ),
    "--migrations-enabled": (
        "migrations_enabled",
        "run requested migrations and join cut-over holds (default on; needs a service account)",
    ),
    "--read-write-split": (
        "routing.read_write_split",
        "send reads outside transactions to healthy replicas (default off)",
    ),
    "--fleet-rules": (
        "routing.fleet_rules",
        "follow the routing rules published with APPLY RULES TO FLEET (default on)",
    ),
}


def _destination(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def build_arg_parser() -> argparse.ArgumentParser:
    """Flags of ``tidegate serve``.  Every default is None: absent flags override nothing."""
    parser = _ArgumentParser(
        prog="tidegate serve",
        description="Run the MySQL sidecar proxy.  Flags override TIDEGATE_* variables, "
        "which override the --config file.  See docs/configuration.md.",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML file (or TIDEGATE_CONFIG)")
    parser.add_argument(
        "--backend",
        metavar="DSN",
        action="append",
        help="mysql://USER:PASSWORD@HOST:PORT/DB?role=replica&name=N&ssl-ca=PATH; repeatable; "
        "the first without role= is the primary, its account is the service account",
    )
    parser.add_argument(
        "--user", metavar="NAME:PASSWORD", action="append", help="client user; repeatable"
    )
    parser.add_argument(
        "--user-hash",
        metavar="NAME:*HEX",
        action="append",
        help="client user with a mysql_native_password hash; repeatable",
    )
    for flag, (_, metavar, help_text) in _FLAG_SCALARS.items():
        parser.add_argument(flag, metavar=metavar, help=help_text)
    for flag, (_, help_text) in _FLAG_BOOLEANS.items():
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    return parser


def _argument_layer(args: argparse.Namespace) -> _Layer:
    layer = _Layer()
    for flag, (path, _, _) in _FLAG_SCALARS.items():
        value = getattr(args, _destination(flag), None)
        if value is not None:
            layer.set(path, value, flag)
    for flag, (path, _) in _FLAG_BOOLEANS.items():
        value = getattr(args, _destination(flag), None)
        if value is not None:
            layer.set(path, value, flag)

    backends = getattr(args, "backend", None)
    if backends:
        layer.values["backends"] = [{"dsn": dsn} for dsn in backends]
        layer.origins["backends"] = "--backend"

    users: list[object] = []
    for flag, secret in (("--user", "password"), ("--user-hash", "password_hash")):
        for item in getattr(args, _destination(flag), None) or ():
            name, colon, value = str(item).partition(":")
            if not colon:
                metavar = "NAME:PASSWORD" if secret == "password" else "NAME:*HEX"
                raise ConfigError(
                    f"users[{len(users)}]: expected {metavar}, got {_show(name)} (set by {flag})",
                    key=f"users[{len(users)}]",
                )
            layer.origins[f"users[{len(users)}]"] = flag
            users.append({"name": name, secret: value})
    if users:
        layer.values["users"] = users
    return layer


def load_config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from parsed ``build_arg_parser()`` flags (lets callers add flags)."""
    env = os.environ if env is None else env
    layers = [_Layer()]
    path = getattr(args, "config", None) or env.get("TIDEGATE_CONFIG") or None
    if path:
        layers.append(_file_layer(path))
    layers.append(_env_layer(env))
    layers.append(_argument_layer(args))
    merged = _merge(layers)
    return _validate(merged.values, _Context(merged.origins))


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Config:
    """Parse ``tidegate serve`` arguments, read the file and environment, validate everything."""
    args = build_arg_parser().parse_args(list(argv))
    return load_config_from_args(args, env)
