"""A supervisor's inbox: the one queue its main loop reads, and the calls on it.

Everything that may change a supervisor's state arrives here: what its
children's runs report (`Exited`, `Ready`, `Health`), a `Wake` (a stop was
requested), and a `Call`, which is a public method's operation waiting to be
run by the main loop. Calls make decisions serial, as in OTP's single
supervisor process: the caller only waits for the answer, so a caller that is
cancelled stops waiting while the operation itself completes.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import trio

from .runtime import Exited, Health, Ready

__all__ = ["Call", "Inbox", "Message", "Wake"]

T = TypeVar("T")


@dataclass(slots=True)
class Wake:
    """Look at the supervisor's flags again (a stop was requested)."""


class Call(Generic[T]):
    """A public method's operation, run by the main loop, answered once."""

    def __init__(self, op: Callable[[], Awaitable[T]], caller: trio.lowlevel.Task) -> None:
        self.op = op
        self.caller = caller
        self.done = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None

    def answer(self, value: T | None = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()

    async def perform(self, cancelled: Callable[[], BaseException]) -> None:
        """Run the operation (in the main loop) and answer with its result or error.

        If the loop itself is cancelled mid-operation, the caller gets
        ``cancelled()`` rather than waiting forever.
        """
        try:
            value = await self.op()
        except Exception as exc:
            self.answer(error=exc)
        else:
            self.answer(value)
        finally:
            if not self.done.is_set():
                self.answer(error=cancelled())

    async def result(self) -> T:
        """Wait for the answer (on the caller's side); raise its error if any."""
        await self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


Message = Exited | Ready | Health | Wake | Call[Any]


class Inbox:
    """An unbounded queue of `Message`: posting never blocks, never fails."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Message](math.inf)

    def post(self, message: Message) -> None:
        self._send.send_nowait(message)

    async def receive_until(self, deadline: float) -> Message | None:
        """The next message, or None once ``deadline`` (monotonic) has passed."""
        with trio.move_on_at(deadline):
            return await self._receive.receive()
        return None

    def refuse_pending(self, error: Callable[[], BaseException]) -> None:
        """Answer every call still queued with ``error()``; drop the rest."""
        while True:
            try:
                message = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            if isinstance(message, Call):
                message.answer(error=error())
