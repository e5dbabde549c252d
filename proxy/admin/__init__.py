"""The admin SQL port (work in progress: listens, not yet serving)."""

from __future__ import annotations

import trio

from proxy.config import AdminConfig
from proxy.control import Control


async def serve_admin(
    control: Control, config: AdminConfig, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    listeners = await trio.open_tcp_listeners(config.listen[1], host=config.listen[0])
    host, port = listeners[0].socket.getsockname()[:2]
    task_status.started((host, port))
    await trio.serve_listeners(_refuse, listeners)


async def _refuse(stream: trio.SocketStream) -> None:
    await stream.aclose()
