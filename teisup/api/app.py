"""The REST control plane: tei-manager's routes, honest statuses, one error shape.

Every error answers ``{"error": <message>, "code": <CODE>, "timestamp": <RFC3339>}``
(tei-manager's shape). A lifecycle call answers once the state snapshot that
records it has been written, or after a bounded wait when it has not (a failed
or slow disk): the change is applied either way, and the answer says whether it
is durable, in an ``X-Teisup-Durable: true|false`` header and, beside
tei-manager's fields, ``"durable"`` in the body. The writer goes on retrying;
/health's ``state`` says whether anything is still unsaved.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..grpc import MultiplexerService
from ..instances import (
    Desired,
    GpuInfo,
    InstanceExists,
    InstanceInfo,
    InstanceManager,
    InstanceNotFound,
    InstanceSpec,
    InvalidGpuId,
    MaxInstancesReached,
    PortError,
    PortRangeExhausted,
)
from ..models import ModelService
from ..security import AllowList, TlsReloader, bearer_matches, peer_certificate
from ..supervision import ChildState, Supervisor, TransitionEvent
from .bodies import ApiError, json_object
from .bodies import error_response as _error
from .dataplane import add_data_plane
from .models import add_model_routes
from .openapi import MAX_WAIT, LogsResponse, ParsedLine, ParsedLogsResponse, openapi_document
from .responses import json_response as _json
from .responses import now as _now
from .views import STATUS_OF, instance_view
from .waiting import WaitVerdict, wait_verdict

__all__ = ["DURABLE_HEADER", "ApiError", "ControlPlane", "Durability", "create_app"]

#: Request bodies larger than this are refused with 413.
MAX_BODY_BYTES = 1 << 20


#: The response header of a lifecycle call: whether its change is on disk yet.
DURABLE_HEADER = "X-Teisup-Durable"


class Durability(Protocol):
    """Whether the state file holds every applied change (encoded into /health)."""

    @property
    def durable(self) -> bool: ...


class ControlPlane(Protocol):
    """What the REST API needs from the running service."""

    @property
    def manager(self) -> InstanceManager: ...

    @property
    def root(self) -> Supervisor: ...

    async def persist(self) -> bool: ...

    def state_status(self) -> Durability: ...

    def gpus(self) -> list[GpuInfo]: ...

    def render_metrics(self) -> bytes: ...

    def on_created(self, info: InstanceInfo) -> None: ...

    def on_deleted(self, name: str) -> None: ...

    async def probe_now(self, name: str) -> dict[str, Any]: ...

    @property
    def api_token(self) -> str | None: ...

    @property
    def protect_health_and_metrics(self) -> bool: ...

    @property
    def data_plane(self) -> MultiplexerService | None: ...

    @property
    def allow_list(self) -> AllowList: ...

    @property
    def tls(self) -> TlsReloader | None: ...

    @property
    def data_body_limit(self) -> int: ...

    @property
    def instance_defaults(self) -> Mapping[str, object]:
        """Instance fields the manager's config sets for a POST that omits them."""
        ...

    @property
    def models(self) -> ModelService: ...


def _invalid(message: str) -> ApiError:
    """A request the control plane refuses: tei-manager's 400 VALIDATION_ERROR."""
    return ApiError(400, "VALIDATION_ERROR", message)


def _applied(info: InstanceInfo | None, durable: bool, status: int = 200) -> Response:
    """A lifecycle call's answer: the instance (or 204) and whether the change is durable."""
    if info is None:
        response = Response(b"", status=204)
    else:
        response = _json(instance_view(info, durable=durable), status)
    response.headers[DURABLE_HEADER] = "true" if durable else "false"
    return response


def _translate(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InstanceNotFound):
        return ApiError(404, "INSTANCE_NOT_FOUND", str(exc))
    # tei-manager answers every refusal of its registry (name taken, port
    # taken, instance limit, no free port) as 400 VALIDATION_ERROR.
    if isinstance(exc, InstanceExists):
        return ApiError(400, "VALIDATION_ERROR", str(exc), "INSTANCE_EXISTS")
    if isinstance(exc, MaxInstancesReached):
        return ApiError(400, "VALIDATION_ERROR", str(exc), "MAX_INSTANCES_REACHED")
    if isinstance(exc, PortRangeExhausted):
        return ApiError(400, "VALIDATION_ERROR", str(exc), "PORT_ALLOCATION_FAILED")
    if isinstance(exc, PortError):
        return ApiError(400, "VALIDATION_ERROR", str(exc), "PORT_CONFLICT")
    if isinstance(exc, InvalidGpuId):
        return ApiError(400, "INVALID_GPU_ID", str(exc))
    raise exc


async def _decode_spec(defaults: Mapping[str, object]) -> InstanceSpec:
    """The request's instance; ``defaults`` fill the fields it leaves out."""
    data = await json_object(MAX_BODY_BYTES, "the body must be a JSON object")
    # tei-manager's CreateInstanceRequest makes every field but these two an
    # Option, which its typed clients send as null: null means "the default".
    given = {k: v for k, v in data.items() if v is not None or k in ("name", "model_id")}
    try:
        return msgspec.convert({**defaults, **given}, InstanceSpec)
    except msgspec.ValidationError as exc:
        raise _invalid(f"invalid instance: {exc}") from None


class _Deletions:
    """An event that fires after each deletion (replaced by a fresh one)."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def happened(self) -> None:
        self.event.set()
        self.event = trio.Event()


async def _next_change(
    events: trio.MemoryReceiveChannel[TransitionEvent], deleted: trio.Event
) -> None:
    """Return after the next transition event or once ``deleted`` is set."""
    async with trio.open_nursery() as nursery:

        async def first(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(first, events.receive)
        nursery.start_soon(first, deleted.wait)


def create_app(plane: ControlPlane) -> QuartTrio:
    """The quart-trio application serving ``plane``."""
    app = QuartTrio("teisup")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    manager = plane.manager

    @app.after_request
    async def close_after_refused_body(response: Response) -> Response:
        # A request refused before its body was read (401, 413, a bad route)
        # leaves that body in the connection, which then cannot carry another
        # request: ask the client to reconnect instead.
        has_body = request.content_length or "Transfer-Encoding" in request.headers
        if response.status_code >= 400 and has_body:
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        return _error(exc.status, exc.code, str(exc), exc.reason)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(
            status, "HTTP_ERROR"
        )
        response = _error(status, code, exc.description or exc.name)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            # RFC 9110: a 405 lists the methods the resource takes.
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    public = {"/health", "/metrics"}
    token = plane.api_token

    # The allow-list checks the client certificate the TLS handshake of this
    # request's connection verified (recorded by teisup's TLS context).
    allow_list = plane.allow_list if plane.tls is not None else AllowList()

    @app.before_request
    async def authenticate() -> Response | None:
        refusal = allow_list.refusal(peer_certificate.get())
        if refusal is not None:
            return _error(403, "FORBIDDEN", refusal)
        if token is None:
            return None
        if request.path in public and not plane.protect_health_and_metrics:
            return None
        if bearer_matches(request.headers.get("Authorization"), token):
            return None
        response = _error(401, "UNAUTHENTICATED", "missing or wrong API token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="teisup"'
        return response

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        app.logger.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "INTERNAL_ERROR", f"internal error: {type(exc).__name__}")

    def lifecycle(
        op: Callable[..., Awaitable[Any]],
    ) -> Callable[..., Awaitable[Response]]:
        async def handler(**kwargs: Any) -> Response:
            try:
                result = await op(**kwargs)
            except Exception as exc:
                raise _translate(exc) from None
            return result  # type: ignore[no-any-return]

        handler.__name__ = op.__name__
        return handler

    @app.get("/health")
    async def health() -> Response:
        infos = manager.all()
        by_state: dict[str, int] = {}
        for info in infos:
            by_state[info.status.value] = by_state.get(info.status.value, 0) + 1
        wanted = [i for i in infos if i.desired is Desired.RUNNING]
        up = [i for i in wanted if i.status is ChildState.RUNNING]
        if not wanted or len(up) == len(wanted):
            aggregate = "healthy"
        elif up:
            aggregate = "degraded"
        else:
            aggregate = "down"
        return _json(
            {
                "status": "healthy",
                "timestamp": _now(),
                "instances": {
                    "status": aggregate,
                    "total": len(infos),
                    "wanted_running": len(wanted),
                    "running": len(up),
                    "by_state": by_state,
                },
                "state": plane.state_status(),
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(plane.render_metrics(), content_type="text/plain; version=0.0.4")

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return _json(openapi_document())

    @app.get("/instances")
    async def list_instances() -> Response:
        return _json([instance_view(info) for info in manager.all()])

    @app.post("/instances")
    @lifecycle
    async def create_instance() -> Response:
        spec = await _decode_spec(plane.instance_defaults)
        info = await manager.create(spec)
        plane.on_created(info)
        durable = await plane.persist()
        return _applied(manager.get(spec.name), durable, 201)

    #: Set (and replaced) after each deletion: a deletion publishes no
    #: transition once the instance is gone, and its waiters must hear of it.
    deletions = _Deletions()

    @app.get("/instances/<name>")
    @lifecycle
    async def get_instance(name: str) -> Response:
        """``?wait=<state>&timeout=<s>`` answers once the instance is in that
        state (event-driven, no polling); at once with 409 when it cannot get
        there without a call (`wait_verdict`), or 404 once it is deleted;
        409 ``WAIT_TIMEOUT`` with its current state after the timeout: the
        instance is not in the asked state, which is the client's condition,
        not a fault of the server (so no 5xx)."""
        wanted_text = request.args.get("wait")
        if wanted_text is None:
            return _json(instance_view(manager.get(name)))
        try:
            wanted = ChildState(wanted_text)
        except ValueError:
            raise _invalid(f"wait: unknown state {wanted_text!r}") from None
        try:
            timeout = float(request.args.get("timeout", "30"))
        except ValueError:
            raise _invalid("timeout must be a number") from None
        if not 0 <= timeout <= MAX_WAIT:
            raise _invalid(f"timeout must be 0-{MAX_WAIT:g} seconds")
        with plane.root.events.subscribe() as events, trio.move_on_after(timeout):
            while True:
                deleted = deletions.event
                info = manager.get(name)
                verdict = wait_verdict(info.status, info.desired, wanted)
                if verdict is not WaitVerdict.PENDING:
                    break
                await _next_change(events, deleted)
        info = manager.get(name)
        verdict = wait_verdict(info.status, info.desired, wanted)
        if verdict is WaitVerdict.UNREACHABLE:
            raise ApiError(
                409,
                "STATE_UNREACHABLE",
                f"instance {name!r} is {info.status.value} (desired {info.desired.value}) "
                f"and cannot become {wanted.value} without a call such as start",
            )
        if verdict is WaitVerdict.PENDING:
            raise ApiError(
                409,
                "WAIT_TIMEOUT",
                f"instance {name!r} is {info.status.value}, not {wanted.value}, after {timeout:g}s",
            )
        return _json(instance_view(info))

    @app.delete("/instances/<name>")
    @lifecycle
    async def delete_instance(name: str) -> Response:
        await manager.delete(name)
        deletions.happened()
        plane.on_deleted(name)
        return _applied(None, await plane.persist(), 204)

    def action_route(action: str) -> None:
        """POST /instances/<name>/<action>: idempotent, answers with the instance."""

        async def act(name: str) -> Response:
            perform: Callable[[str], Awaitable[InstanceInfo]] = getattr(manager, action)
            await perform(name)
            durable = await plane.persist()
            return _applied(manager.get(name), durable)

        act.__name__ = f"{action}_instance"
        app.post(f"/instances/<name>/{action}")(lifecycle(act))

    for action in ("start", "stop", "restart"):
        action_route(action)

    @app.get("/instances/<name>/logs")
    @lifecycle
    async def instance_logs(name: str) -> Response:
        manager.get(name)
        args = request.args
        try:
            tail = args.get("tail", type=int)
            start = args.get("start", type=int)
            end = args.get("end", type=int)
        except ValueError:
            raise _invalid("tail, start and end must be integers") from None
        if (
            ("tail" in args and tail is None)
            or ("start" in args and start is None)
            or ("end" in args and end is None)
        ):
            raise _invalid("tail, start and end must be integers")
        form = args.get("format", "text")
        if form not in ("text", "parsed"):
            raise _invalid(f"format must be text or parsed, not {form!r}")
        everything = manager.logs(name)
        total = len(everything)
        if tail is not None:
            if tail < 0:
                raise _invalid("tail must be >= 0")
            start, end = max(0, total - tail), total
        first, stop, _ = slice(start, end).indices(total)
        stop = max(first, stop)
        lines = everything[first:stop]
        if form == "parsed":
            return _json(ParsedLogsResponse([ParsedLine.of(x) for x in lines], first, stop, total))
        return _json(LogsResponse([line.text for line in lines], first, stop, total))

    @app.get("/instances/<name>/health")
    @lifecycle
    async def instance_health(name: str) -> Response:
        info = manager.get(name)
        live = await plane.probe_now(name)
        return _json(
            {
                "name": name,
                "status": STATUS_OF[info.status],
                "state": info.status,
                "health_check_failures": info.health_check_failures,
                "last_health_check": info.last_health_check,
                "last_error": info.last_error,
                "probe": live,
            }
        )

    @app.get("/gpus")
    async def gpus() -> Response:
        return _json(plane.gpus())

    @app.get("/supervisor/tree")
    async def supervisor_tree() -> Response:
        return _json(plane.root.snapshot())

    add_model_routes(app, lambda: plane.models)
    if plane.data_plane is not None:
        add_data_plane(app, plane.data_plane, max_body=plane.data_body_limit)
    return app
