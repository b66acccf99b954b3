"""MCP requests in flight, so a shutdown can wait for them before it ends long-lived streams.

Why: a Streamable HTTP `tools/call` is answered on an SSE stream, and sse-starlette ends every SSE
stream as soon as uvicorn sees SIGTERM, cutting calls that were about to finish. The CLI turns that
off and instead, on SIGTERM: stops accepting, waits here until the POSTs in flight have been answered
(bounded by the drain window), then lets the remaining streams (standalone GET and listen streams,
which never end by themselves) close.
"""

from __future__ import annotations

import anyio


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        self._idle = anyio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        if self._idle.is_set():
            self._idle = anyio.Event()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
