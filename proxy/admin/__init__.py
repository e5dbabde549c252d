"""The admin SQL port: operators use any MySQL client to see and steer tidegate.

In the spirit of ProxySQL's admin port, state is tables (``sessions``,
``backends``, ``holds``, ``stats``, ``settings``, ``migrations``,
``sidecars``) and changes are ``INSERT``/``UPDATE`` on ``migrations`` plus a
few verbs (``CANCEL MIGRATION 3``).  Unlike ProxySQL nothing is staged: every
statement acts at once, and every SELECT shows what is live.  See
docs/admin.md.

``tables`` and ``statements`` are pure (SQL in, rows or commands out);
``session`` dispatches to ``proxy.control``; ``server`` runs mysql-mimic
inside trio through trio-asyncio.
"""

from proxy.admin.server import serve_admin

__all__ = ["serve_admin"]
