"""Configuration: sources and precedence, DSNs, and error messages that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import (
    BackendConfig,
    Config,
    ConfigError,
    Limits,
    TLSConfig,
    build_arg_parser,
    load_config,
    load_config_from_args,
    parse_dsn,
)

SERVICE = "mysql://svc:secret@db:3306"
HASH = "*6BB4837EB74329105EE4568DDA7DC67ED2CA2AD9"


def load(*argv: str, env: dict[str, str] | None = None) -> Config:
    return load_config(list(argv), env or {})


def error_of(*argv: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load(*argv, env=env)
    return str(caught.value)


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tidegate.toml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ("ca", "cert", "key"):
        path = tmp_path / f"{name}.pem"
        path.write_text("-----BEGIN NOTHING-----\n")
        files[name] = str(path)
    return files


# --------------------------------------------------------------------------- simplest start


def test_one_backend_flag_is_a_complete_configuration() -> None:
    config = load("--backend", SERVICE)
    assert config.primary == BackendConfig(
        name="primary", host="db", port=3306, user="svc", password="secret", role="primary"
    )
    assert config.service_account == ("svc", "secret")
    assert config.replicas == ()
    assert config.users == ()
    assert config.listen == ("127.0.0.1", 6033)
    assert config.http_listen == ("127.0.0.1", 9104)
    assert config.admin.listen == ("127.0.0.1", 6032)
    assert config.limits == Limits()
    assert config.log_level == "info"
    assert config.load_users_from_backend is True
    assert config.client_tls is None


def test_config_is_frozen() -> None:
    config = load("--backend", SERVICE)
    with pytest.raises(AttributeError):
        config.listen = ("0.0.0.0", 1)  # type: ignore[misc]


def test_secrets_stay_out_of_repr_and_redacted_view() -> None:
    config = load("--backend", SERVICE, "--user", "app:hunter2", "--user-hash", f"rep:{HASH}")
    assert "secret" not in repr(config)
    assert "hunter2" not in repr(config)
    text = json.dumps(config.redacted())
    assert "secret" not in text and "hunter2" not in text and HASH[1:] not in text
    assert config.redacted()["listen"] == "127.0.0.1:6033"


# --------------------------------------------------------------------------- DSNs


def test_parse_dsn_decodes_everything() -> None:
    backend = parse_dsn("mysql://us%3Aer:p%40ss%2Fw:rd@db.internal:3307/shop%2D1", key="k")
    assert (backend.user, backend.password) == ("us:er", "p@ss/w:rd")
    assert (backend.host, backend.port, backend.database) == ("db.internal", 3307, "shop-1")
    assert (backend.name, backend.role, backend.tls) == ("primary", "primary", None)


def test_parse_dsn_defaults_and_options(pem: dict[str, str]) -> None:
    backend = parse_dsn(
        f"mariadb://r@[::1]/?role=replica&name=r1&ssl_ca={pem['ca']}&ssl-verify=false"
        "&ssl-server-name=db.example",
        key="k",
    )
    assert (backend.host, backend.port, backend.user, backend.password) == ("::1", 3306, "r", None)
    assert (backend.role, backend.name, backend.database) == ("replica", "r1", None)
    assert backend.tls == TLSConfig(ca=pem["ca"], verify=False, server_name="db.example")
    assert parse_dsn("mysql://db?ssl=true", key="k").tls == TLSConfig()
    assert parse_dsn("mysql://[::1]:3310", key="k").port == 3310
    assert parse_dsn("mysql://db?role=replica", key="k").name == "replica1"


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("mysql://svc:x@db:99999", "backends[1].dsn: port must be 1..65535, got 99999"),
        ("mysql://svc:x@db:0", "port must be 1..65535, got 0"),
        ("mysql://db:abc", 'port must be 1..65535, got "abc"'),
        ("db:3306", "expected mysql://"),
        ("postgres://db", "scheme must be mysql://"),
        ("mysql://", "host is missing"),
        ("mysql://:pw@db", "password was given without a user"),
        ("mysql://db/a/b", "at most one path segment"),
        ("mysql://db?rol=replica", "unknown option 'rol' (did you mean 'role'?)"),
        ("mysql://db?role=a&role=b", "option 'role' given twice"),
        ("mysql://db?role=leader", 'backends[1].dsn (role): expected "primary" or "replica"'),
        ("mysql://db?ssl=false&ssl-verify=true", "ssl=false contradicts"),
        ("mysql://db?ssl-ca=/no/such/file.pem", "backends[1].dsn (ssl-ca): file not found"),
        ("mysql://db?name=has space", "backends[1].dsn (name): expected letters"),
        ("mysql://[::1", "not a valid URL"),
    ],
)
def test_parse_dsn_errors_name_the_key(dsn: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_dsn(dsn, key="backends[1].dsn")
    assert message in str(caught.value)
    assert str(caught.value).startswith("backends[1].dsn")


def test_dsn_errors_never_echo_the_password() -> None:
    message = error_of("--backend", "mysql://svc:topsecret@db:99999")
    assert "topsecret" not in message


@given(st.text(max_size=80))
def test_parse_dsn_raises_only_config_error(text: str) -> None:
    for candidate in (text, "mysql://" + text):
        try:
            parse_dsn(candidate, key="k")
        except ConfigError:
            pass


# --------------------------------------------------------------------------- backends and roles


def test_first_backend_without_role_is_primary_others_replicas() -> None:
    config = load("--backend", SERVICE, "--backend", "mysql://db2", "--backend", "mysql://db3")
    assert [(b.name, b.role, b.host) for b in config.backends] == [
        ("primary", "primary", "db"),
        ("replica1", "replica", "db2"),
        ("replica2", "replica", "db3"),
    ]


def test_explicit_primary_wins_over_position() -> None:
    config = load("--backend", "mysql://db1", "--backend", "mysql://svc:pw@db2?role=primary")
    assert config.primary.host == "db2"
    assert config.replicas[0].name == "replica1"
    assert config.service_account == ("svc", "pw")


def test_role_errors() -> None:
    assert "backends[1]: more than one primary" in error_of(
        "--backend", f"{SERVICE}?role=primary", "--backend", "mysql://a:b@db2?role=primary"
    )
    assert "backends: no primary" in error_of("--backend", f"{SERVICE}?role=replica")


def test_duplicate_backend_names() -> None:
    message = error_of("--backend", f"{SERVICE}?name=x", "--backend", "mysql://db2?name=x")
    assert message.startswith('backends[1].name: duplicate backend name "x"')


def test_default_names_step_around_explicit_ones() -> None:
    config = load(
        "--backend", SERVICE, "--backend", "mysql://a", "--backend", "mysql://b?name=replica1"
    )
    assert [b.name for b in config.backends] == ["primary", "replica1_", "replica1"]


def test_config_primary_property_requires_exactly_one() -> None:
    with pytest.raises(ConfigError, match="exactly one primary"):
        _ = Config().primary
    two = BackendConfig(name="a", host="h")
    with pytest.raises(ConfigError, match="found 2"):
        _ = Config(backends=(two, BackendConfig(name="b", host="h"))).primary


def test_no_service_account_needs_users() -> None:
    message = error_of("--backend", "mysql://db")
    assert message.startswith("users: no client users are configured")
    config = load("--backend", "mysql://db", "--user", "app:pw")
    assert config.service_account is None
    message = error_of("--backend", SERVICE, "--no-load-users-from-backend")
    assert "load_users_from_backend is false" in message


def test_no_backend_at_all() -> None:
    assert error_of().startswith("backends: at least one backend is required")


# --------------------------------------------------------------------------- TOML file

FULL = """
listen = "0.0.0.0:6033"
http_listen = "127.0.0.1:9200"
log_level = "DEBUG"
load_users_from_backend = false

[[backends]]
name = "main"
dsn = "mysql://svc:secret@db:3306/shop"
role = "primary"
[backends.tls]
ca = "{ca}"
server_name = "db.example"

[[backends]]
host = "replica.internal"
port = 3307
user = "ro"
password = "ro-pw"

[[users]]
name = "app"
password = "secret"

[[users]]
name = "reporting"
password_hash = "{hash}"

[limits]
idle_timeout = 600
backend_queue_timeout = "250ms"
max_allowed_packet = "16M"
max_client_connections = 20

[client_tls]
cert = "{cert}"
key = "{key}"
required = true

[admin]
listen = "127.0.0.1:7032"
user = "root"
password = "admin-pw"
"""


def test_full_file(tmp_path: Path, pem: dict[str, str]) -> None:
    path = write_toml(tmp_path, FULL.format(hash=HASH.lower(), **pem))
    config = load("--config", path)
    assert config.listen == ("0.0.0.0", 6033)
    assert config.http_listen == ("127.0.0.1", 9200)
    assert config.log_level == "debug"
    assert config.load_users_from_backend is False
    main, replica = config.backends
    assert (main.name, main.role, main.database) == ("main", "primary", "shop")
    assert main.tls == TLSConfig(ca=pem["ca"], server_name="db.example")
    assert (replica.name, replica.role, replica.host, replica.port) == (
        "replica1",
        "replica",
        "replica.internal",
        3307,
    )
    assert (replica.user, replica.password) == ("ro", "ro-pw")
    assert [(u.name, u.password, u.password_hash) for u in config.users] == [
        ("app", "secret", None),
        ("reporting", None, HASH),  # normalised to upper case
    ]
    assert config.limits.idle_timeout == 600.0
    assert config.limits.backend_queue_timeout == 0.25
    assert config.limits.max_allowed_packet == 16 * 1024 * 1024
    assert config.limits.max_client_connections == 20
    assert config.limits.connect_timeout == Limits().connect_timeout
    assert config.client_tls is not None
    assert (config.client_tls.cert, config.client_tls.required) == (pem["cert"], True)
    assert (config.admin.listen, config.admin.user, config.admin.password) == (
        ("127.0.0.1", 7032),
        "root",
        "admin-pw",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('lisen = "x:1"', "unknown key 'lisen' (did you mean 'listen'?) in "),
        (
            "[limits]\nidle_timout = 5",
            "unknown key 'limits.idle_timout' (did you mean 'limits.idle_timeout'?)",
        ),
        ("[[rules]]\nmatch = 'x'", "rules[0].id: required: an integer"),
        ("[[rules]]\nid = 1\nmatch = '('\nroute = 'primary'", "rules[0].match: invalid regular expression '('"),
        ("[[rules]]\nid = 1\nroute = 'replica7'", "rules[0].route: unknown backend 'replica7'"),
        ("[[rules]]\nid = 1\nroute = 'primary'\n[[rules]]\nid = 1\nroute = 'primary'",
         "rules[1].id: duplicate rule id 1 (also rules[0])"),
        ("[routing]\nread_write_split = true", "routing.read_write_split: needs at least one backend"),
        ("[routing]\nmax_replica_lag = -1", "routing.max_replica_lag: must be > 0 seconds"),
        ("[backpressure]\npriorities = { batch = 0 }", "backpressure.priorities.batch: expected a factor > 0"),
        ("[backpressure]\nmigration_scope = 'some'", 'backpressure.migration_scope: expected "table" or "all"'),
        (
            '[[backends]]\ndsn = "mysql://a:b@h"\nrole = "primary"\nhots = "x"',
            "unknown key 'backends[0].hots' (did you mean 'backends[0].host'?)",
        ),
        (
            '[limits]\nidle_timeout = "abc"',
            'limits.idle_timeout: expected a number of seconds, got "abc" (set by ',
        ),
        ("[limits]\nidle_timeout = -1", "limits.idle_timeout: must be > 0 seconds"),
        ("[limits]\nidle_timeout = 0", "limits.idle_timeout: must be > 0 seconds"),
        ("[limits]\nidle_timeout = nan", "limits.idle_timeout: expected a number of seconds"),
        ("[limits]\nidle_timeout = inf", "limits.idle_timeout: must be at most one year"),
        (
            "[limits]\nmax_client_connections = true",
            "limits.max_client_connections: expected an integer, got true",
        ),
        (
            "[limits]\nmax_client_connections = 0",
            "limits.max_client_connections: must be 1..1000000, got 0",
        ),
        (
            "[limits]\nmax_allowed_packet = 10",
            "limits.max_allowed_packet: must be 1024..1073741824 bytes",
        ),
        (
            '[limits]\nmax_allowed_packet = "lots"',
            "limits.max_allowed_packet: expected a size in bytes",
        ),
        ("limits = 5", "limits: expected a table, got 5"),
        ('listen = "6033"', "listen: expected HOST:PORT"),
        ('listen = "127.0.0.1:70000"', "listen: port must be 0..65535, got 70000"),
        ('log_level = "loud"', "log_level: expected one of debug, info"),
        ("backends = 3", "backends: expected an array of tables"),
        ('[[backends]]\nname = "x"', "backends[0]: needs a dsn (or a host)"),
        (
            '[[backends]]\ndsn = "mysql://a:b@h"\nhost = "h"',
            "backends[0].host: give either dsn or host",
        ),
        (
            '[[backends]]\ndsn = "mysql://a:b@h?role=replica"\nrole = "primary"',
            'backends[0].role: "primary" contradicts role=replica',
        ),
        ('[[backends]]\nhost = "h"\nport = 99999', "backends[0].port: must be 1..65535, got 99999"),
        (
            '[[backends]]\ndsn = "mysql://a:b@h?ssl=1"\n[backends.tls]\nverify = false',
            "backends[0].tls: TLS is set both",
        ),
        (
            '[[backends]]\ndsn = "mysql://a:b@h"\n[backends.tls]\nca = "/nonexistent.pem"',
            "backends[0].tls.ca: file not found: /nonexistent.pem",
        ),
        (
            '[[backends]]\ndsn = "mysql://a:b@h"\n[backends.tls]\nverify = "maybe"',
            'backends[0].tls.verify: expected true or false, got "maybe"',
        ),
        ('[[users]]\nname = "a"', "users[0]: give exactly one of password and password_hash"),
        (
            '[[users]]\nname = "a"\npassword = "x"\npassword_hash = "y"',
            "users[0]: give exactly one",
        ),
        (
            '[[users]]\nname = "a"\npassword_hash = "6BB4837EB74329105EE4568DDA7DC67ED2CA2AD9"',
            "users[0].password_hash: expected MySQL's native form",
        ),
        ('[[users]]\npassword = "x"', "users[0].name: required"),
        (
            '[[users]]\nname = "a"\npassword = "x"\n[[users]]\nname = "a"\npassword = "y"',
            'users[1].name: duplicate user "a"',
        ),
        ('[client_tls]\ncert = "/nonexistent"', "client_tls.key: required"),
        ('[admin]\nlisten = "0.0.0.0:6032"', "admin.listen: 0.0.0.0 is not a loopback address"),
        (
            "[admin]\nallow_remote = true",
            "admin.password: required when admin.allow_remote is true",
        ),
        ('[admin]\nlisten = "127.0.0.1:6033"', "admin.listen: port 6033 is also used by listen"),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_toml(tmp_path, text)
    # A --backend flag would replace the file's backends, so give one only when the file has none.
    extra = () if "backends" in text else ("--backend", SERVICE)
    assert message in error_of("--config", path, *extra)


def test_file_backends_error_is_reported_against_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[[backends]]\ndsn = "mysql://a:b@db:99999"')
    assert error_of("--config", path) == (
        f"backends[0].dsn: port must be 1..65535, got 99999 (set by {path})"
    )


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    assert "config: file not found" in error_of("--config", str(tmp_path / "missing.toml"))
    path = write_toml(tmp_path, "listen = ")
    assert "is not valid TOML" in error_of("--config", path)


def test_tls_cert_needs_key(tmp_path: Path, pem: dict[str, str]) -> None:
    path = write_toml(
        tmp_path, f'[[backends]]\ndsn = "{SERVICE}"\n[backends.tls]\ncert = "{pem["cert"]}"'
    )
    assert "backends[0].tls.key: cert and key must be given together" in error_of("--config", path)


def test_admin_may_listen_remotely_with_a_password() -> None:
    config = load(
        "--backend",
        SERVICE,
        "--admin-listen",
        "0.0.0.0:6032",
        "--admin-allow-remote",
        env={"TIDEGATE_ADMIN_PASSWORD": "pw"},
    )
    assert config.admin.allow_remote and config.admin.password == "pw"


# --------------------------------------------------------------------------- precedence


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        f"""
listen = "127.0.0.1:1001"
http_listen = "127.0.0.1:1002"
[[backends]]
dsn = "{SERVICE}"
[limits]
idle_timeout = 100
connect_timeout = 3
handshake_timeout = 4
""",
    )
    env = {
        "TIDEGATE_CONFIG": path,
        "TIDEGATE_HTTP_LISTEN": "127.0.0.1:2002",
        "TIDEGATE_LIMITS_IDLE_TIMEOUT": "200",
        "TIDEGATE_LIMITS_CONNECT_TIMEOUT": "1.5",
    }
    config = load("--idle-timeout", "5m", env=env)
    assert config.listen == ("127.0.0.1", 1001)  # file
    assert config.http_listen == ("127.0.0.1", 2002)  # env over file
    assert config.limits.idle_timeout == 300.0  # flag over env over file
    assert config.limits.connect_timeout == 1.5  # env over file
    assert config.limits.handshake_timeout == 4.0  # file over default
    assert config.limits.shutdown_grace == 5.0  # default
    assert config.primary.host == "db"


def test_lists_are_replaced_whole_by_a_higher_source(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        f'[[backends]]\ndsn = "{SERVICE}"\n[[backends]]\ndsn = "mysql://r1"\n'
        '[[users]]\nname = "a"\npassword = "x"',
    )
    env = {"TIDEGATE_BACKEND": "mysql://svc:pw@envdb, mysql://envreplica"}
    config = load("--config", path, env=env)
    assert [b.host for b in config.backends] == ["envdb", "envreplica"]
    assert [u.name for u in config.users] == ["a"]
    config = load(
        "--config", path, "--backend", "mysql://svc:pw@flagdb", "--user", "b:y:z", env=env
    )
    assert [b.host for b in config.backends] == ["flagdb"]
    assert [(u.name, u.password) for u in config.users] == [("b", "y:z")]


def test_flag_config_path_beats_env_config_path(tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    first.write_text('listen = "127.0.0.1:1111"')
    second = tmp_path / "b.toml"
    second.write_text('listen = "127.0.0.1:2222"')
    config = load(
        "--config", str(second), "--backend", SERVICE, env={"TIDEGATE_CONFIG": str(first)}
    )
    assert config.listen == ("127.0.0.1", 2222)


def test_env_values(pem: dict[str, str]) -> None:
    env = {
        "TIDEGATE_BACKEND": SERVICE,
        "TIDEGATE_LISTEN": "[::1]:7000",
        "TIDEGATE_LOG_LEVEL": "warn",
        "TIDEGATE_LOAD_USERS_FROM_BACKEND": "yes",
        "TIDEGATE_LIMITS_MAX_ALLOWED_PACKET": "1G",
        "TIDEGATE_LIMITS_MAX_BACKEND_CONNECTIONS": "7",
        "TIDEGATE_LIMITS_SHUTDOWN_GRACE": "0",
        "TIDEGATE_CLIENT_TLS_CERT": pem["cert"],
        "TIDEGATE_CLIENT_TLS_KEY": pem["key"],
        "TIDEGATE_CLIENT_TLS_CA": pem["ca"],
        "TIDEGATE_CLIENT_TLS_REQUIRED": "on",
        "TIDEGATE_ADMIN_USER": "",  # empty means unset
        "TIDEGATE_KEEP_DB": "1",  # someone else's variable
        "PATH": "/bin",
    }
    config = load(env=env)
    assert config.listen == ("::1", 7000)
    assert config.log_level == "warning"
    assert config.limits.max_allowed_packet == 1024**3
    assert config.limits.max_backend_connections == 7
    assert config.limits.shutdown_grace == 0.0
    assert config.client_tls is not None and config.client_tls.ca == pem["ca"]
    assert config.client_tls.required is True
    assert config.admin.user == "admin"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "TIDEGATE_LIMITS_IDLE_TIMOUT",
            "unknown environment variable TIDEGATE_LIMITS_IDLE_TIMOUT (did you mean TIDEGATE_LIMITS_IDLE_TIMEOUT?)",
        ),
        ("TIDEGATE_BACKENDS", "(did you mean TIDEGATE_BACKEND?)"),
        ("TIDEGATE_ADMIN_PASS", "unknown environment variable TIDEGATE_ADMIN_PASS"),
    ],
)
def test_unknown_env_variables_in_our_families(name: str, message: str) -> None:
    assert message in error_of("--backend", SERVICE, env={name: "1"})


def test_env_errors_name_key_and_variable() -> None:
    message = error_of(env={"TIDEGATE_BACKEND": SERVICE, "TIDEGATE_LIMITS_IDLE_TIMEOUT": "abc"})
    assert message == (
        'limits.idle_timeout: expected a number of seconds, got "abc" '
        "(set by TIDEGATE_LIMITS_IDLE_TIMEOUT)"
    )
    message = error_of(env={"TIDEGATE_BACKEND": "mysql://a:b@db, mysql://c@db2:99999"})
    assert message == "backends[1].dsn: port must be 1..65535, got 99999 (set by TIDEGATE_BACKEND)"


def test_flag_errors() -> None:
    assert error_of("--backend", SERVICE, "--idle-timeout", "soon") == (
        'limits.idle_timeout: expected a number of seconds, got "soon" (set by --idle-timeout)'
    )
    assert error_of("--bogus").startswith("command line: unrecognized arguments: --bogus")
    assert (
        error_of("--user", "nocolon")
        == 'users[0]: expected NAME:PASSWORD, got "nocolon" (set by --user)'
    )
    assert "listen: port 9104 is also used by http_listen (set by --listen)" in error_of(
        "--backend", SERVICE, "--listen", "127.0.0.1:9104"
    )


def test_parser_accepts_extra_flags_through_load_config_from_args() -> None:
    parser = build_arg_parser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(["--backend", SERVICE, "--check", "--max-client-connections", "9"])
    config = load_config_from_args(args, env={})
    assert config.limits.max_client_connections == 9


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1.5", 1.5), ("250ms", 0.25), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), (".5", 0.5)],
)
def test_duration_forms(text: str, seconds: float) -> None:
    config = load("--backend", SERVICE, "--handshake-timeout", text)
    assert config.limits.handshake_timeout == seconds
