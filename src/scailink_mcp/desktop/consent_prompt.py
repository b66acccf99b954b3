"""Consent prompters for the desktop client: who answers a `scailink/consent_request`.

A `ConsentPrompter` is any async callable `(tool, arguments) -> (decision, remember)`. The client
applies the request's `expires_ms` around it, so a prompter never has to time itself out.

Must not: decide anything by itself beyond what it is told (no caching of answers: ScaiLink keeps
`remember: session` approvals on its side).
"""

from __future__ import annotations

import json
import sys
import threading
from contextlib import suppress
from typing import Any, Literal, Protocol, TextIO

import anyio
import anyio.from_thread
import anyio.lowlevel

Decision = Literal["approved", "denied"]
Remember = Literal["once", "session"]


class ConsentPrompter(Protocol):
    """Asks whether `tool` may run with `arguments`."""

    async def __call__(self, tool: str, arguments: Any) -> tuple[Decision, Remember]: ...


async def auto_approve(tool: str, arguments: Any) -> tuple[Decision, Remember]:
    """`--auto-approve`: every request is approved once, unasked (unattended runs and tests)."""
    return "approved", "once"


def parse_answer(line: str) -> tuple[Decision, Remember]:
    """`y`/`yes` approves once, `s`/`session` for the session; anything else (or end of input) denies."""
    answer = line.strip().lower()
    if answer in ("s", "session"):
        return "approved", "session"
    return ("approved" if answer in ("y", "yes") else "denied"), "once"


class TerminalConsent:
    """Asks the person at the terminal, one request at a time.

    stdin is read by a short-lived thread, so the event loop keeps serving calls and heartbeats while
    a question is open. A line answers the question on screen when it arrives: one typed after a
    question expired answers nothing, so it can never approve the next, different request.
    """

    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._lock = anyio.Lock()
        self._waiter: anyio.Event | None = None
        self._line: str | None = None
        self.reading = False  # a reader thread is blocked on stdin

    async def __call__(self, tool: str, arguments: Any) -> tuple[Decision, Remember]:
        async with self._lock:
            shown = json.dumps(arguments, ensure_ascii=False, default=str)
            shown = shown if len(shown) <= 500 else shown[:500] + "…"
            self._stdout.write(f"\nAllow tool {tool} with {shown}? [y]es / [n]o / [s]ession: ")
            self._stdout.flush()
            return parse_answer(await self._next_line())

    async def _next_line(self) -> str:
        self._waiter, self._line = anyio.Event(), None
        try:
            if not self.reading:
                self.reading = True
                token = anyio.lowlevel.current_token()
                threading.Thread(target=self._read, args=(token,), daemon=True).start()
            await self._waiter.wait()
            return self._line or ""
        finally:
            self._waiter = None

    def _read(self, token: anyio.lowlevel.EventLoopToken) -> None:
        line = self._stdin.readline()
        with suppress(anyio.RunFinishedError):  # the client has exited meanwhile
            anyio.from_thread.run_sync(self._deliver, line, token=token)

    def _deliver(self, line: str) -> None:
        self.reading = False
        if self._waiter is not None:
            self._line = line
            self._waiter.set()
