"""The HTTP API (FastAPI): grants, executions, health and metrics.

Who is calling (the `Caller`):

- On the Unix socket, the caller is trusted: only members of the socket's group can connect
  (mode 0660). It states the tenant it acts for in the `X-Poolfs-Tenant` header, which matters
  only for creating grants; it may create, see and delete every execution.
- On the optional TCP listener, every request except /healthz needs `Authorization: Bearer
  TOKEN`. A token belongs to one tenant (tokens file: `TENANT sha256:HEX`): that tenant creates
  grants as itself, may create executions only as their creator (`creatorTenantId`), and sees
  and deletes only those. A token whose tenant is `*` is a trusted caller, as on the socket.

Status codes: 400 malformed request (every problem listed), 401 no identity, 403 refused (with a
machine-readable `reason`), 404 unknown pool or execution, 409 execution id taken or still
mounting, 500 a mount failed (nothing of the execution is left mounted), 503 the store is
unreachable or mountd is stopping. Every error body is an `ErrorResponse`.

No `from __future__ import annotations` here: FastAPI resolves the endpoints' annotations at
runtime, and they refer to names local to `create_app`.
"""

import dataclasses
import hashlib
import hmac
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter

from mountd.access import AccessDenied, UnknownPool, authorize_grant_request, decide_mount
from mountd.manager import (
    ExecutionBusy,
    ExecutionExists,
    ManagerClosed,
    MountFailed,
    MountManager,
    MountSpec,
)
from mountd.metrics import Metrics
from mountd.models import (
    ErrorResponse,
    ExecutionInfo,
    ExecutionList,
    ExecutionRequest,
    GrantRequest,
    GrantResponse,
    Health,
    Problem,
)
from poolfs.catalog import Catalog
from poolfs.grants import GrantSecret
from poolfs.refs import DATA_KEY, ExecutionBodyError, RunSignature, parse_execution_body
from poolfs.stores import StoreError

__all__ = ["TENANT_HEADER", "ApiError", "Caller", "TokenTable", "create_app"]

log = logging.getLogger(__name__)

TENANT_HEADER = "X-Poolfs-Tenant"
API_VERSION = "1.0.0"
_ANY_TENANT = "*"


class ApiError(Exception):
    """An error answer: status plus an ErrorResponse body."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        reason: str | None = None,
        param: str | None = None,
        problems: list[Problem] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body = ErrorResponse(detail=detail, reason=reason, param=param, problems=problems)
        self.headers = dict(headers or {})


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling. `tenant` None: not stated. `trusted`: may act for any tenant."""

    tenant: str | None
    trusted: bool

    def may_see(self, creator: str) -> bool:
        return self.trusted or self.tenant == creator


class TokenTable:
    """Bearer tokens of the TCP listener, kept only as SHA-256 digests.

    File format: one `TENANT sha256:HEX` a line; `#` starts a comment; TENANT `*` marks a
    trusted caller. `mountd token --tenant T` prints a fresh token and its line.
    """

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._digests = dict(digests)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "TokenTable":
        digests: dict[str, str] = {}
        with open(path, encoding="utf-8") as file:
            for number, raw in enumerate(file, 1):
                line = raw.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2 or not parts[1].startswith("sha256:") or len(parts[1]) != 7 + 64:
                    raise ValueError(
                        f"{os.fspath(path)}:{number}: expected 'TENANT sha256:HEX' (64 hex digits)"
                    )
                digests[parts[1][7:].lower()] = parts[0]
        return cls(digests)

    @staticmethod
    def digest(token: str) -> str:
        return hashlib.sha256(token.encode("utf-8")).hexdigest()

    def tenant_of(self, token: str) -> str | None:
        presented = self.digest(token)
        found = None
        for digest, tenant in self._digests.items():
            # Compare every entry in constant time: no early exit that a timer could see.
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found


def _problems_from_validation(exc: RequestValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(Problem(location=location, message=str(error.get("msg", "invalid"))))
    return problems


def _generic_signature(body: Mapping[str, Any]) -> RunSignature:
    """mountd does not know run(): every body key but `data` must be a DataPool reference,
    which is exactly what the refs parser checks for a run() with those parameters."""
    return RunSignature(
        function_name="the execution",
        data_param=DATA_KEY,
        data_type=Any,
        data_required=False,
        pool_params=tuple(key for key in body if key != DATA_KEY),
        return_type=Any,
        data_adapter=TypeAdapter(Any),
    )


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request; `problems` lists why."},
    401: {"model": ErrorResponse, "description": "No caller identity (header or token)."},
    403: {"model": ErrorResponse, "description": "Refused; `reason` says why."},
    404: {"model": ErrorResponse, "description": "Unknown data pool or execution."},
    409: {"model": ErrorResponse, "description": "Execution id taken, or still mounting."},
    500: {"model": ErrorResponse, "description": "A mount failed; nothing is left mounted."},
    503: {"model": ErrorResponse, "description": "Store unreachable, or mountd stopping."},
}


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: _ERRORS[code] for code in codes}


def create_app(
    *,
    catalog: Catalog,
    secret: GrantSecret,
    manager: MountManager,
    metrics: Metrics,
    socket_path: str | None,
    tokens: TokenTable | None,
) -> FastAPI:
    """The API over the given catalog, grant secret and mount manager (module docstring).

    `socket_path` tells requests on the trusted Unix socket from TCP ones; `tokens` are the
    TCP listener's bearer tokens (None: TCP requests are refused).
    """
    app = FastAPI(
        title="poolfs mountd",
        version=API_VERSION,
        # The document is served at /openapi.json; the browser UIs would load scripts from a
        # CDN, which an execution node has no business reaching.
        docs_url=None,
        redoc_url=None,
        description="The node mount daemon: mounts data pools for service executions. "
        f"On the Unix socket the trusted caller names its tenant in `{TENANT_HEADER}`; on TCP "
        "every request but /healthz carries a bearer token.",
    )
    bearer = HTTPBearer(
        auto_error=False,
        description="TCP listener only: a token from the tokens file (`mountd token`).",
    )

    def caller(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        tenant_header: Annotated[
            str | None,
            Header(
                alias=TENANT_HEADER,
                description="The tenant the trusted caller acts for (Unix socket, or a `*` "
                "token). Needed to create grants.",
            ),
        ] = None,
    ) -> Caller:
        server = request.scope.get("server")
        on_socket = socket_path is not None and server is not None and server[0] == socket_path
        if on_socket:
            return Caller(tenant_header or None, trusted=True)
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or tokens is None:
            raise ApiError(401, "a bearer token is required on TCP", headers=challenge)
        tenant = tokens.tenant_of(credentials.credentials)
        if tenant is None:
            raise ApiError(401, "unknown bearer token", headers=challenge)
        if tenant == _ANY_TENANT:
            return Caller(tenant_header or None, trusted=True)
        if tenant_header is not None and tenant_header != tenant:
            raise ApiError(
                403,
                f"this token acts for tenant {tenant!r}, not {tenant_header!r}",
                reason="tenant_mismatch",
            )
        return Caller(tenant, trusted=False)

    CallerDep = Annotated[Caller, Depends(caller)]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            exc.body.model_dump(by_alias=True, exclude_none=True),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.inc("requests_rejected_total")
        problems = _problems_from_validation(exc)
        body = ErrorResponse(detail="malformed request", problems=problems)
        return JSONResponse(body.model_dump(by_alias=True, exclude_none=True), status_code=400)

    def store_down(exc: StoreError) -> ApiError:
        metrics.inc("errors_total", kind="store_unavailable")
        log.error("store error: %s", exc)
        return ApiError(503, f"the store is unavailable: {exc}")

    def denied(exc: AccessDenied) -> ApiError:
        metrics.inc("access_denied_total", reason=exc.reason)
        log.info("access denied (%s): %s", exc.reason, exc.message)
        return ApiError(403, exc.message, reason=exc.reason, param=exc.param)

    def visible(caller: Caller, execution_id: str) -> ExecutionInfo:
        info = manager.get(execution_id)
        if info is None or not caller.may_see(info.creator_tenant_id):
            raise ApiError(404, f"execution {execution_id!r} not found")
        return info

    @app.post(
        "/datapools/{datapool_id}/grants",
        response_model=GrantResponse,
        responses=_responses(400, 401, 403, 404, 503),
        summary="Create a short-lived access grant for a data pool",
        description="The caller's tenant needs VIEWER on the pool for a VIEW grant and "
        "MAINTAINER for MODIFY. The grant is scoped to the pool, the application and the "
        "caller's tenant, and expires after 15 minutes.",
    )
    def create_grant(
        datapool_id: Annotated[str, Path(description="The data pool's UUID.")],
        request: GrantRequest,
        who: CallerDep,
    ) -> GrantResponse:
        try:
            pool_id = uuid.UUID(datapool_id)
        except ValueError:
            raise ApiError(404, f"data pool {datapool_id!r} not found (not a UUID)") from None
        if who.tenant is None:
            raise ApiError(401, f"no caller tenant: set the {TENANT_HEADER} header")
        try:
            token = authorize_grant_request(
                catalog,
                secret,
                pool_id=pool_id,
                application_id=request.application_id,
                tenant=who.tenant,
                permission=request.permission,
            )
        except UnknownPool as exc:
            raise ApiError(404, str(exc)) from None
        except AccessDenied as exc:
            raise denied(exc) from None
        except StoreError as exc:
            raise store_down(exc) from exc
        metrics.inc("grants_issued_total", permission=request.permission.value)
        log.info(
            "issued a %s grant on data pool %s to tenant %r for application %s",
            request.permission.value,
            pool_id,
            who.tenant,
            request.application_id,
        )
        return GrantResponse(token=token)

    @app.post(
        "/executions",
        response_model=ExecutionInfo,
        status_code=201,
        responses=_responses(400, 401, 403, 404, 409, 500, 503),
        summary="Mount every data pool of an execution",
        description="Mounts each DataPool reference of `body` at "
        "<mount_root>/<executionId>/<param>: read-only or writeable as its grant says, or, "
        "without a grant, as the creator tenant's own role on the pool allows. All or "
        "nothing: if one pool cannot be mounted, none is.",
    )
    def create_execution(request: ExecutionRequest, who: CallerDep) -> ExecutionInfo:
        if not who.may_see(request.creator_tenant_id):
            raise ApiError(
                403,
                f"this caller acts for tenant {who.tenant!r} and may not create executions "
                f"of tenant {request.creator_tenant_id!r}",
                reason="not_creator",
            )
        if manager.closing:
            raise ApiError(503, "mountd is shutting down")
        try:
            parsed = parse_execution_body(_generic_signature(request.body), request.body)
        except ExecutionBodyError as exc:
            metrics.inc("requests_rejected_total")
            problems = [
                Problem(location=f"body.{p.location}", message=p.message) for p in exc.problems
            ]
            raise ApiError(400, "malformed execution body", problems=problems) from None
        bad = [
            Problem(location=f"body.{param}", message="not a usable parameter (directory) name")
            for param in parsed.refs
            if not param.isidentifier() or len(param.encode()) > 255
        ]
        if bad:
            metrics.inc("requests_rejected_total")
            raise ApiError(400, "malformed execution body", problems=bad)
        if manager.get(request.execution_id) is not None:
            raise ApiError(409, f"execution {request.execution_id!r} exists already")
        specs: dict[str, MountSpec] = {}
        try:
            for param, ref in parsed.refs.items():
                decision = decide_mount(
                    catalog,
                    secret,
                    param=param,
                    ref=ref,
                    application_id=request.application_id,
                    creator_tenant=request.creator_tenant_id,
                )
                specs[param] = MountSpec(decision, catalog.pool_url(ref.id))
        except UnknownPool as exc:
            raise ApiError(404, str(exc), param=exc.param) from None
        except AccessDenied as exc:
            raise denied(exc) from None
        except StoreError as exc:
            raise store_down(exc) from exc
        try:
            return manager.create(
                request.execution_id, request.application_id, request.creator_tenant_id, specs
            )
        except ExecutionExists as exc:
            raise ApiError(409, str(exc)) from None
        except ManagerClosed as exc:
            raise ApiError(503, str(exc)) from None
        except MountFailed as exc:
            notes = "; ".join(getattr(exc, "__notes__", []))
            detail = f"{exc} ({notes})" if notes else str(exc)
            raise ApiError(500, detail, param=exc.param or None) from None

    @app.get(
        "/executions",
        response_model=ExecutionList,
        responses=_responses(401),
        summary="List executions (live, then recently finished)",
    )
    def list_executions(who: CallerDep) -> ExecutionList:
        return ExecutionList(
            executions=[e for e in manager.executions() if who.may_see(e.creator_tenant_id)]
        )

    @app.get(
        "/executions/{execution_id}",
        response_model=ExecutionInfo,
        responses=_responses(401, 404),
        summary="One execution: its mounts, state and errors",
    )
    def get_execution(execution_id: str, who: CallerDep) -> ExecutionInfo:
        return visible(who, execution_id)

    @app.delete(
        "/executions/{execution_id}",
        response_model=ExecutionInfo,
        responses=_responses(401, 404, 409),
        summary="Flush and unmount every pool of an execution",
        description="Returns once every mount is gone. Pending writes are uploaded first; "
        "`failed` and `errors` report any upload that failed (the staged bytes are kept in "
        "the spill dir's lost+found) or a worker that had to be killed.",
    )
    def delete_execution(execution_id: str, who: CallerDep) -> ExecutionInfo:
        visible(who, execution_id)
        try:
            info = manager.delete(execution_id)
        except ExecutionBusy as exc:
            raise ApiError(409, str(exc)) from None
        if info is None:
            raise ApiError(404, f"execution {execution_id!r} not found")
        return info

    @app.get("/healthz", response_model=Health, summary="Liveness (no authentication)")
    def healthz() -> Health:
        executions, mounts = manager.counts()
        return Health(
            status="stopping" if manager.closing else "ok", executions=executions, mounts=mounts
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
            **_responses(401),
        },
        summary="Prometheus metrics",
    )
    def prometheus(who: CallerDep) -> Response:
        return PlainTextResponse(
            metrics.render(manager.samples()),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    _fix_openapi(app)
    return app


def _fix_openapi(app: FastAPI) -> None:
    """Make the document say what the API does: validation errors answer 400 with an
    ErrorResponse (not FastAPI's 422), and the bearer token is needed only on TCP."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = original()
        for operations in document.get("paths", {}).values():
            for operation in operations.values():
                if "security" in operation:
                    # `{}`: no authentication is also accepted (the trusted Unix socket).
                    operation["security"] = [{}, *operation["security"]]
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {
                        "description": "Malformed request; `problems` lists why.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                            }
                        },
                    }
        schemas = document.get("components", {}).get("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
