#!/usr/bin/env python3
"""Container health check for tidegate: GET /healthz (or the path given) on the HTTP port.

Exit 0 on a 200 answer, 1 otherwise, as Docker's HEALTHCHECK expects.  The
port is taken from where tidegate itself reads it: ``TIDEGATE_HTTP_LISTEN``,
else ``http_listen`` in the file named by ``TIDEGATE_CONFIG``, else 9104.
Standard library only: it runs in the image without tidegate's packages.

    tidegate-healthcheck            # liveness: the event loop answers
    tidegate-healthcheck /readyz    # readiness: the primary is reachable, not draining
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.error
import urllib.request

DEFAULT_PORT = 9104


def http_port(environ: dict[str, str]) -> int:
    """The port tidegate serves HTTP on, by the same precedence as its configuration."""
    address = environ.get("TIDEGATE_HTTP_LISTEN") or ""
    if not address and environ.get("TIDEGATE_CONFIG"):
        try:
            with open(environ["TIDEGATE_CONFIG"], "rb") as file:
                address = str(tomllib.load(file).get("http_listen", ""))
        except (OSError, tomllib.TOMLDecodeError):
            address = ""
    if not address:
        return DEFAULT_PORT
    return int(address.rpartition(":")[2])


def check(path: str = "/healthz", environ: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    """True when tidegate answers ``path`` with 200 on loopback."""
    try:
        port = http_port(dict(os.environ) if environ is None else environ)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    return 0 if check(path) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
