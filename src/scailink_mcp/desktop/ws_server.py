"""uvicorn's WebSocket protocol (the `websockets` sans-I/O one, uvicorn's default) answering refused
upgrades, and holding no handshake once it is done: `uvicorn_config` in `serving.py` passes it as `ws=`.

Why: when an upgrade request breaks a parser limit of `websockets` (a header line over
`WEBSOCKETS_MAX_LINE_LENGTH`, 8 KiB; more than `WEBSOCKETS_MAX_NUM_HEADERS`, 128; a request line too
long) or is not valid HTTP, `websockets` prepares a 431/414 response (or an EOF) but raises no event,
and uvicorn writes nothing: the socket stayed open, holding a file descriptor, until the client gave
up. This protocol sends what `websockets` prepared and closes the connection at once.

Memory: uvicorn keeps the parsed upgrade request and the handshake response (their header tables) for
the connection's whole life, though it never reads them after the handshake (the ASGI scope has its
own copy of the headers): ~4 KiB of each idle desktop session, dropped once the handshake is sent.
"""

from __future__ import annotations

import logging
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        refused = self.conn.handshake_exc
        if refused is None or self.handshake_initiated or self.transport.is_closing():
            return
        logger.info(
            "websocket upgrade refused",
            extra={"reason": str(refused)[:120], "client": self.client[0] if self.client else None},
        )
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and "request" in vars(self):
            # Read only until the handshake is sent (see above). The header table is emptied, not just
            # let go: the `websockets` parser's generator still holds the request it parsed.
            self.request.headers.clear()
            del self.request, self.response
