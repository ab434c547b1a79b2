"""``POST /models/{id}/load``: start an instance of the model, embed once, stop it.

The instance is an ordinary one of the instance manager (its ports, logs,
health checks, GPU pinning), named ``model-load-<hash>``, never restarted
(a model that cannot load fails the test at once), deleted afterwards
whatever happened. `Loader` is the seam the registry service takes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, suppress
from typing import Any, Protocol

import trio

from ..instances import InstanceManager, InstanceNotFound, InstanceSpec, RestartPolicy
from ..proto.tei.v1 import tei_grpc, tei_pb2
from ..rpc import Channel, RpcStatusError, RpcUnavailable, call_once
from ..supervision import ChildState, RestartType, TransitionEvent

__all__ = ["LOAD_TIMEOUT", "InstanceSmokeTest", "Loader", "smoke_instance_name"]

logger = logging.getLogger("teisup.models")

#: tei-manager's bound on a smoke test.
LOAD_TIMEOUT = 300.0
#: What the smoke test embeds.
PROBE_TEXT = "teisup smoke test"

Subscribe = Callable[[], AbstractContextManager[trio.MemoryReceiveChannel[TransitionEvent]]]


class Loader(Protocol):
    """Runs a model once; None if it embedded, else why not."""

    async def smoke_test(self, model_id: str) -> str | None: ...

    async def forget_leftovers(self) -> list[str]:
        """Remove what smoke tests of an earlier run left (a manager killed meanwhile)."""
        ...


def smoke_instance_name(model_id: str) -> str:
    """The instance name a smoke test of ``model_id`` uses (a valid, stable name)."""
    return "model-load-" + hashlib.sha256(model_id.encode()).hexdigest()[:12]


_SMOKE_NAME = re.compile(r"model-load-[0-9a-f]{12}")


class InstanceSmokeTest:
    """`Loader` through the instance manager; ``subscribe`` opens the tree's transition events."""

    def __init__(
        self, manager: InstanceManager, subscribe: Subscribe, *, timeout: float = LOAD_TIMEOUT
    ) -> None:
        self._manager = manager
        self._subscribe = subscribe
        self._timeout = timeout

    async def smoke_test(self, model_id: str) -> str | None:
        name = smoke_instance_name(model_id)
        spec = InstanceSpec(
            name=name,
            model_id=model_id,
            max_concurrent_requests=1,
            max_batch_tokens=256,
            startup_timeout_secs=self._timeout,
            stop_grace_secs=10.0,
            restart=RestartPolicy(type=RestartType.TRANSIENT, max_restarts=0),
        )
        try:
            with self._subscribe() as events:
                try:
                    await self._manager.create(spec)
                except Exception as exc:  # refused before it started: no ports, a limit
                    return f"cannot start an instance of it: {exc}"
                with trio.move_on_after(self._timeout) as waited:
                    failure = await self._until_running(name, events)
                if waited.cancelled_caught:
                    return f"the instance did not become ready within {self._timeout:g}s"
                if failure is not None:
                    return failure
            return await self._embed_once(name)
        finally:
            with trio.CancelScope(shield=True), suppress(InstanceNotFound):
                await self._manager.delete(name)

    async def forget_leftovers(self) -> list[str]:
        """Delete the smoke-test instances a killed manager saved in its state.

        Called before the saved instances are started again, so none of them runs.
        """
        leftovers = [name for name in self._manager.names() if _SMOKE_NAME.fullmatch(name)]
        for name in leftovers:
            with suppress(InstanceNotFound):
                await self._manager.delete(name)
            logger.warning("deleted the smoke-test instance %s an earlier run left", name)
        return leftovers

    async def _until_running(
        self, name: str, events: trio.MemoryReceiveChannel[TransitionEvent]
    ) -> str | None:
        while True:
            info = self._manager.get(name)
            if info.status is ChildState.RUNNING:
                return None
            if info.status in (ChildState.FAILED, ChildState.BACKOFF) or (
                info.status is ChildState.STOPPED and info.last_exit is not None
            ):
                return self._why(name, info.last_error)
            async for event in events:
                if event.child_id == name:
                    break

    def _why(self, name: str, last_error: str | None) -> str:
        lines = [line.message or line.text for line in self._manager.logs(name)]
        hints = [line for line in lines if "rror" in line or "not found" in line.lower()]
        detail = hints[-1] if hints else (lines[-1] if lines else "")
        reason = last_error or "the instance exited"
        return f"{reason}: {detail}" if detail else reason

    async def _embed_once(self, name: str) -> str | None:
        info = self._manager.get(name)

        async def call(channel: Channel) -> Any:
            request = tei_pb2.EmbedRequest(inputs=PROBE_TEXT)
            return await tei_grpc.EmbedStub(channel).Embed(request)

        try:
            reply = await call_once("127.0.0.1", info.port, call, timeout=60.0)
        except (RpcStatusError, RpcUnavailable) as exc:
            return f"the instance started but did not embed: {exc}"
        if not len(reply.embeddings):
            return "the instance started but answered an empty embedding"
        logger.info(
            "smoke test of %s: embedded %d dimensions", info.model_id, len(reply.embeddings)
        )
        return None
