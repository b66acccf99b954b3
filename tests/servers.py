"""Real HTTP servers the tests run in-process: an ASGI app served by uvicorn in a thread.

`ThreadedServer` is the one way a test serves an app on 127.0.0.1 (ScaiLink itself through
`conftest.LiveApp`, small upstreams and fixtures such as `JwksServer`). The socket is bound and
listening before the thread starts, so the port is known at once and nothing can take it in
between; entering waits on an event set by uvicorn's start-up (no polling) and fails when it did
not start. `tests/upstream.py` keeps its own thread: it stops and restarts on one reserved port.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0
DEFAULTS: dict[str, Any] = {"log_config": None, "access_log": False}


class _Server(uvicorn.Server):
    """Sets `ready` when start-up is over, whether it succeeded (`started`) or not."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:  # a failed lifespan start-up exits with SystemExit: `__enter__` must not wait it out
            self.ready.set()


class ThreadedServer:
    """`app` (or a ready `uvicorn.Config`) served by uvicorn in a daemon thread on 127.0.0.1.

    `options` are `uvicorn.Config` options over `DEFAULTS` (no logging config, no access log); host
    and port are not among them: the server listens on a socket of its own.
    """

    def __init__(self, app: Any, **options: Any) -> None:
        config = app if isinstance(app, uvicorn.Config) else uvicorn.Config(app, **(DEFAULTS | options))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((HOST, 0))
        self._sock.listen(64)  # early requests wait in the backlog until uvicorn accepts them
        self.port: int = self._sock.getsockname()[1]
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._server.ready.wait(START_TIMEOUT_S) or not self._server.started:
            self.__exit__()
            raise RuntimeError(f"the server on port {self.port} did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        self._sock.close()  # uvicorn closed it already unless start-up failed


class JwksServer(ThreadedServer):
    """A JWKS document at `url`, counting its fetches; a `status` other than 200 makes it fail."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0
        super().__init__(Starlette(routes=[Route("/jwks", self._jwks)]), lifespan="off")

    @property
    def url(self) -> str:
        return f"{self.base_url}/jwks"

    async def _jwks(self, request: Request) -> Response:
        self.fetches += 1
        if self.status != 200:
            return PlainTextResponse("unavailable", status_code=self.status)
        return JSONResponse({"keys": self.keys})

    def reset(self) -> None:
        self.keys, self.status, self.fetches = [], 200, 0
