"""``tidegate`` command line: serve, migrate, schema-version, demo."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="tidegate",
        description="MySQL sidecar proxy with an online schema-change migrator.",
    )
    parser.add_argument("command", choices=["serve", "migrate", "schema-version", "demo", "lead-migration"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from proxy.app import serve_main

        return serve_main(rest)
    if command in ("migrate", "schema-version"):
        from migrator.cli import main as migrator_main

        return migrator_main([command, *rest])
    if command == "lead-migration":  # internal: a sidecar's child leading one migration
        from proxy.migrations import lead_main

        return lead_main(rest)
    if command == "demo":
        from proxy.demo import demo_main

        return demo_main(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
