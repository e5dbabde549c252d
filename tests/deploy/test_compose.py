"""deploy/compose: the file's structure, and its SQL, replica setup and load generator against real MariaDB.

Docker is not available in CI, so the stack itself cannot start here.  What
can run does: ``primary-init.sql`` is applied to the test session's MariaDB
primary (under a throwaway database name), replicated to its GTID replica,
and must give tidegate's service account every privilege the migrator checks
for; then ``loadgen.py`` runs for two seconds through a real ``tidegate
serve`` and the image's health check script asks that tidegate's endpoints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from proxy import sandbox
from proxy.config import load_config

from .conftest import COMPOSE, DEPLOY, ROOT, load_documents

COMPOSE_DIR = COMPOSE.parent
BINLOG_FLAGS = {
    "--binlog-format": "ROW",
    "--binlog-row-image": "FULL",
    "--binlog-row-metadata": "FULL",
    "--gtid-strict-mode": "ON",
    "--log-slave-updates": "ON",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (document,) = load_documents(COMPOSE)
    return document


def flags(service: dict[str, Any]) -> dict[str, str]:
    return dict(flag.split("=", 1) for flag in service["command"] if "=" in flag)


def test_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"primary", "replica", "tidegate", "loadgen", "prometheus", "grafana"}
    for name, service in compose["services"].items():
        image = service.get("image", "")
        assert image, f"{name} has no image"
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
        for published in service.get("ports", []):
            assert str(published).startswith("127.0.0.1:"), f"{name} publishes {published} beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["observability"]


def test_databases_have_the_binlog_the_migrator_needs(compose: dict[str, Any]) -> None:
    primary, replica = compose["services"]["primary"], compose["services"]["replica"]
    for service in (primary, replica):
        assert BINLOG_FLAGS.items() <= flags(service).items()
        assert "--log-bin" in flags(service)
        assert service["healthcheck"]["test"][:2] == ["CMD", "healthcheck.sh"]
    # the cut-over's triggers, created by a user without SUPER while the binlog is on
    assert flags(primary)["--log-bin-trust-function-creators"] == "ON"
    assert flags(primary)["--server-id"] != flags(replica)["--server-id"]
    assert flags(replica)["--read-only"] == "ON"
    assert replica["depends_on"]["primary"]["condition"] == "service_healthy"
    assert any(v.endswith("/docker-entrypoint-initdb.d/10-primary-init.sql:ro") for v in primary["volumes"])
    assert any(v.endswith("/docker-entrypoint-initdb.d/10-replica-init.sh:ro") for v in replica["volumes"])
    assert os.access(COMPOSE_DIR / "replica-init.sh", os.X_OK)


def test_tidegate_service(compose: dict[str, Any]) -> None:
    service = compose["services"]["tidegate"]
    assert (COMPOSE_DIR / service["build"]["context"] / service["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    environment = {key: str(value) for key, value in service["environment"].items()}
    config = load_config([], {"TIDEGATE_CONFIG": str(DEPLOY / "docker" / "tidegate.toml"), **environment})
    assert [(b.host, b.role) for b in config.backends] == [("primary", "primary"), ("replica", "replica")]
    assert config.listen == ("0.0.0.0", 6033) and config.http_listen == ("0.0.0.0", 9104)
    grace = float(re.sub(r"s$", "", service["stop_grace_period"]))
    assert grace > config.limits.shutdown_grace
    assert service["healthcheck"]["test"] == ["CMD", "tidegate-healthcheck", "/readyz"]
    assert {"primary", "replica"} == set(service["depends_on"])
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]


def test_loadgen_talks_to_tidegate_like_a_pod_neighbour(compose: dict[str, Any]) -> None:
    service = compose["services"]["loadgen"]
    assert service["network_mode"] == "service:tidegate"
    url = urllib.parse.urlsplit(service["environment"]["DATABASE_URL"])
    assert (url.hostname, url.port) == ("127.0.0.1", 6033)


def test_credentials_agree_with_the_init_scripts(compose: dict[str, Any]) -> None:
    sql = (COMPOSE_DIR / "primary-init.sql").read_text()
    created = dict(re.findall(r"CREATE USER IF NOT EXISTS '(\w+)'@'%' IDENTIFIED (?:BY |VIA \w+ USING PASSWORD\()'([^']+)'", sql))
    assert set(created) == {"repl", "tidegate", "shop"}
    backend = compose["services"]["tidegate"]["environment"]["TIDEGATE_BACKEND"]
    for dsn in backend.split(","):
        parts = urllib.parse.urlsplit(dsn)
        assert created[parts.username] == parts.password
    app = urllib.parse.urlsplit(compose["services"]["loadgen"]["environment"]["DATABASE_URL"])
    assert created[app.username] == app.password
    replica = compose["services"]["replica"]["environment"]
    assert created[replica["REPLICATION_USER"]] == replica["REPLICATION_PASSWORD"]
    assert replica["PRIMARY_HOST"] == "primary"


def test_observability_profile_wiring(compose: dict[str, Any]) -> None:
    (prometheus,) = load_documents(COMPOSE_DIR / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "tidegate", "the dashboard and alerts select job=tidegate"
    assert job["static_configs"][0]["targets"] == ["tidegate:9104"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert any(m.startswith("../grafana/tidegate-dashboard.json:") for m in mounts)
    (datasources,) = load_documents(COMPOSE_DIR / "grafana" / "provisioning.yaml")
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------- against real MariaDB

def _init_sql(database: str) -> str:
    """primary-init.sql for a throwaway database instead of `shop`."""
    return (COMPOSE_DIR / "primary-init.sql").read_text().replace("`shop`", f"`{database}`")


@pytest.fixture
def initialised(primary: sandbox.Instance, replica: sandbox.Instance, database: str) -> str:
    result = subprocess.run(
        ["mariadb", "-h127.0.0.1", f"-P{primary.port}", f"-u{primary.user}", f"-p{primary.password}"],
        input=_init_sql(database), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    sandbox.wait_replica_caught_up(primary, replica)
    return database


async def test_service_account_has_what_the_migrator_checks(primary: sandbox.Instance, initialised: str) -> None:
    from migrator import db, inspector

    settings = db.ConnectionSettings.from_dsn(
        f"mysql://tidegate:tidegate-pass@127.0.0.1:{primary.port}/{initialised}"
    )
    async with db.Connection(settings) as connection:
        await inspector.check_privileges(connection, initialised, "_tidegate")
        rows = await connection.query("SELECT COUNT(*) FROM mysql.user")
        assert rows[0][0] > 0


def test_replica_receives_the_users_and_schema(replica: sandbox.Instance, initialised: str) -> None:
    users = {row[0] for row in replica.execute("SELECT User FROM mysql.user")}
    assert {"repl", "tidegate", "shop"} <= users
    assert replica.execute(f"SHOW TABLES FROM `{initialised}`") == [("orders",)]


def test_loadgen_through_tidegate(primary: sandbox.Instance, initialised: str, tmp_path: Path) -> None:
    port, http_port = sandbox.free_port(), sandbox.free_port()
    environment = {
        **os.environ,
        "TIDEGATE_BACKEND": f"mysql://tidegate:tidegate-pass@127.0.0.1:{primary.port}/{initialised}",
        "TIDEGATE_LISTEN": f"127.0.0.1:{port}",
        "TIDEGATE_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "TIDEGATE_ADMIN_LISTEN": f"127.0.0.1:{sandbox.free_port()}",
        "TIDEGATE_MIGRATIONS_ENABLED": "false",  # leave the session primary's _tidegate alone
    }
    environment.pop("TIDEGATE_CONFIG", None)
    log = tmp_path / "tidegate.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "serve"], env=environment, stdout=output, stderr=output, cwd=ROOT
        )
    healthcheck = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([*healthcheck, "/readyz"], env=environment).returncode != 0:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "tidegate did not become ready:\n" + log.read_text()
            time.sleep(0.2)
        assert subprocess.run([*healthcheck, "/healthz"], env=environment).returncode == 0
        result = subprocess.run(
            [sys.executable, str(COMPOSE_DIR / "loadgen.py")],
            env={
                **os.environ,
                "DATABASE_URL": f"mysql://shop:shop-pass@127.0.0.1:{port}/{initialised}",
                "LOADGEN_RATE": "100",
                "LOADGEN_WORKERS": "2",
                "LOADGEN_SECONDS": "2",
                "LOADGEN_REPORT": "1",
            },
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
        assert re.search(r"\d+\.\d ok/s\s+0 errors", result.stdout), result.stdout
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0, log.read_text()
    (count,) = primary.execute(f"SELECT COUNT(*) FROM `{initialised}`.orders")[0]
    assert count > 0
