"""Stopping a Tornado server that runs on an asyncio loop in a thread of its own (the HTTP front doors and
the health/metrics port): the close must run on that loop, so it is scheduled there and waited for."""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Optional


def stop_server_thread(loop: Optional[asyncio.AbstractEventLoop], server: Any, thread: threading.Thread,
                       timeout_s: float = 10.0) -> bool:
    """Stop accepting, close every open connection, stop ``loop`` and join ``thread``. False (nothing done)
    when the loop is not running."""
    if loop is None or not loop.is_running():
        return False

    async def close() -> None:
        if server is not None:
            server.stop()
            await server.close_all_connections()
        loop.stop()

    asyncio.run_coroutine_threadsafe(close(), loop)
    thread.join(timeout_s)
    return True
