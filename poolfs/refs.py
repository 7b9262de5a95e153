"""Execution requests: the data model plus one DataPool reference per `DataPool` parameter.

A service's `run(data: Model, my_dataset: DataPool, ...)` defines its request body:

    {"data": {...}, "my_dataset": {"id": "<uuid>", "ref": "DATAPOOL", "grant": "<jwt>"}}

Rules (the platform guide's, plus the choices where it is silent):
- A parameter is a DataPool parameter when its annotation resolves to `poolfs.datapool.DataPool`
  (string annotations from `from __future__ import annotations` are resolved with
  `typing.get_type_hints`; an annotation that cannot be resolved is a RunSignatureError).
- The data parameter is the one named `data`, validated with pydantic against its annotation
  (any type pydantic accepts; unannotated means any JSON). Without a default it is required.
  A `run` without a `data` parameter accepts a body whose `data` is absent, null or {}.
- Every other parameter needs a default (it is not fed from the body); positional-only
  parameters are refused, since everything is passed by keyword.
- Body keys other than `data` and the DataPool parameters are errors, as are unknown keys
  inside a reference. Parsing collects every problem before failing, and each names the
  parameter and what is wrong.
- The OpenAPI document is 3.1 (its Schema Objects are JSON Schema 2020-12, which is what
  pydantic produces); nested models go to `components/schemas`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal
from uuid import UUID

import pydantic
from pydantic import BaseModel, ConfigDict, TypeAdapter

from poolfs.datapool import DataPool

__all__ = [
    "DATAPOOL_REF_SCHEMA",
    "DATA_KEY",
    "BodyProblem",
    "DataPoolRef",
    "ExecutionBodyError",
    "ExecutionRequest",
    "RequestSchema",
    "RunSignature",
    "RunSignatureError",
    "inspect_run",
    "openapi_document",
    "parse_execution_body",
    "request_schema",
    "validate_data",
]

DATA_KEY = "data"
OPENAPI_VERSION = "3.1.0"
EXECUTION_PATH = "/service-executions"
_REF_TEMPLATE = "#/components/schemas/{model}"
_REF_KEYS = ("id", "ref", "grant")

# The guide's schema for a DataPool parameter, plus the optional grant it documents.
DATAPOOL_REF_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {
            "type": "string",
            "format": "uuid",
            "description": "UUID of the Data Pool to mount",
        },
        "ref": {
            "type": "string",
            "enum": ["DATAPOOL"],
            "description": "Reference type indicating this is a Data Pool",
        },
        "grant": {
            "type": "string",
            "description": "Optional access grant (JWT) for a data pool the application "
            "creator cannot access directly",
        },
    },
    "required": ["id", "ref"],
    "additionalProperties": False,
}


class DataPoolRef(BaseModel):
    """One data pool reference in an execution body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: UUID
    ref: Literal["DATAPOOL"]
    grant: str | None = None


class RunSignatureError(TypeError):
    """`run` cannot be called by the platform as written; the message says why."""


@dataclasses.dataclass(frozen=True, slots=True)
class RunSignature:
    """What the platform needs to know about a `run` function."""

    function_name: str
    data_param: str | None
    data_type: Any
    data_required: bool
    pool_params: tuple[str, ...]
    return_type: Any
    data_adapter: TypeAdapter[Any]


@dataclasses.dataclass(frozen=True, slots=True)
class BodyProblem:
    """One thing wrong with an execution body. `location` is dotted: `my_dataset.id`."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ExecutionBodyError(ValueError):
    """The body does not fit `run`. `problems` lists every problem found, not just the first."""

    def __init__(self, problems: list[BodyProblem], what: str = "execution body") -> None:
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"invalid {what} ({len(self.problems)} problem(s)):\n{lines}")


@dataclasses.dataclass(frozen=True, slots=True)
class ExecutionRequest:
    """A validated execution body. `has_data` is False when `data` is to be left to run()'s
    default (or run() takes no data)."""

    data: Any
    has_data: bool
    refs: dict[str, DataPoolRef]


def inspect_run(run: Callable[..., Any]) -> RunSignature:
    """Find the data parameter and the DataPool parameters of `run`."""
    name = getattr(run, "__qualname__", repr(run))
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError) as exc:
        raise RunSignatureError(f"cannot read the signature of {name}: {exc}") from exc
    try:
        hints = typing.get_type_hints(run)
    except Exception as exc:
        raise RunSignatureError(
            f"cannot resolve the annotations of {name}: {exc} (import every type used in "
            "run()'s annotations at module level)"
        ) from exc
    data_param: str | None = None
    data_type: Any = Any
    data_required = False
    pools: list[str] = []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise RunSignatureError(
                f"{name}: parameter {param.name!r} is positional-only; the platform passes "
                "every argument by keyword"
            )
        hint = hints.get(param.name, Any)
        if hint is DataPool:
            pools.append(param.name)
        elif param.name == DATA_KEY:
            data_param = param.name
            data_type = hint
            data_required = param.default is param.empty
        elif _mentions_datapool(hint):
            raise RunSignatureError(
                f"{name}: parameter {param.name!r} must be annotated exactly `DataPool` "
                f"(got {hint!r}); optional or container DataPool parameters are not supported"
            )
        elif param.default is param.empty:
            raise RunSignatureError(
                f"{name}: parameter {param.name!r} is neither `data` nor a DataPool and has no "
                "default, so the platform cannot fill it"
            )
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(data_type)
    except pydantic.PydanticSchemaGenerationError as exc:
        raise RunSignatureError(
            f"{name}: pydantic cannot validate the data type {data_type!r}: {exc}"
        ) from exc
    return RunSignature(
        function_name=name,
        data_param=data_param,
        data_type=data_type,
        data_required=data_required,
        pool_params=tuple(pools),
        return_type=hints.get("return", Any),
        data_adapter=adapter,
    )


def _mentions_datapool(hint: Any) -> bool:
    return any(arg is DataPool or _mentions_datapool(arg) for arg in typing.get_args(hint))


def _join(*parts: object) -> str:
    return ".".join(str(part) for part in parts if str(part) != "")


def _data_problems(error: pydantic.ValidationError, prefix: str) -> list[BodyProblem]:
    return [
        BodyProblem(_join(prefix, *detail["loc"]), detail["msg"])
        for detail in error.errors(include_url=False)
    ]


def validate_data(
    signature: RunSignature, raw: Any, location: str = DATA_KEY
) -> tuple[Any, list[BodyProblem]]:
    """Validate the data part against run()'s data type: (value, problems)."""
    try:
        return signature.data_adapter.validate_python(raw), []
    except pydantic.ValidationError as exc:
        return None, _data_problems(exc, location)


_EXAMPLE_REF = '{"id": "<uuid>", "ref": "DATAPOOL"}'


def _ref_problem(param: str, detail: Mapping[str, Any]) -> BodyProblem:
    loc = tuple(detail["loc"])
    kind = detail["type"]
    where = _join(param, *loc)
    given = detail.get("input")
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        return BodyProblem(param, f"must be an object like {_EXAMPLE_REF}, got {given!r}")
    if kind == "missing":
        return BodyProblem(where, "missing")
    if kind == "extra_forbidden":
        return BodyProblem(where, f"unknown key (allowed: {', '.join(_REF_KEYS)})")
    if loc == ("id",):
        return BodyProblem(where, f"not a valid UUID: {given!r}")
    if loc == ("ref",):
        return BodyProblem(where, f'must be "DATAPOOL", got {given!r}')
    if loc == ("grant",):
        return BodyProblem(where, f"must be a string (a grant token), got {type(given).__name__}")
    return BodyProblem(where, str(detail["msg"]))


def parse_execution_body(
    run: Callable[..., Any] | RunSignature, body: Mapping[str, Any] | str | bytes
) -> ExecutionRequest:
    """Validate an execution body against `run`; ExecutionBodyError lists every problem."""
    signature = run if isinstance(run, RunSignature) else inspect_run(run)
    if isinstance(body, str | bytes):
        try:
            body = json.loads(body)
        except ValueError as exc:
            raise ExecutionBodyError([BodyProblem("body", f"not valid JSON: {exc}")]) from None
    if not isinstance(body, Mapping):
        raise ExecutionBodyError(
            [BodyProblem("body", f"must be a JSON object, got {type(body).__name__}")]
        )
    problems: list[BodyProblem] = []
    data: Any = None
    has_data = False
    if signature.data_param is not None:
        if DATA_KEY in body:
            data, data_problems = validate_data(signature, body[DATA_KEY])
            problems.extend(data_problems)
            has_data = True
        elif signature.data_required:
            problems.append(BodyProblem(DATA_KEY, "missing"))
    elif body.get(DATA_KEY) not in (None, {}):
        problems.append(
            BodyProblem(DATA_KEY, f"{signature.function_name} takes no data; send {{}} or omit it")
        )
    refs: dict[str, DataPoolRef] = {}
    for param in signature.pool_params:
        if param not in body:
            problems.append(
                BodyProblem(param, f"missing DataPool reference (expected {_EXAMPLE_REF})")
            )
            continue
        try:
            refs[param] = DataPoolRef.model_validate(body[param])
        except pydantic.ValidationError as exc:
            problems.extend(_ref_problem(param, d) for d in exc.errors(include_url=False))
    known = {DATA_KEY, *signature.pool_params}
    for key in body:
        if key not in known:
            expected = ", ".join(sorted(known))
            problems.append(BodyProblem(str(key), f"unknown key (expected: {expected})"))
    if problems:
        raise ExecutionBodyError(problems)
    return ExecutionRequest(data=data, has_data=has_data, refs=refs)


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSchema:
    """The request body's Schema Object and the named schemas it refers to
    (`#/components/schemas/<name>`)."""

    body: dict[str, Any]
    components: dict[str, Any]
    response: dict[str, Any]


def _schema_with_defs(
    adapter: TypeAdapter[Any], mode: Literal["validation", "serialization"]
) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = adapter.json_schema(ref_template=_REF_TEMPLATE, mode=mode)
    defs = schema.pop("$defs", {})
    return schema, defs


def request_schema(run: Callable[..., Any] | RunSignature) -> RequestSchema:
    """The OpenAPI request-body schema of `run`: `data` from its type, each DataPool
    parameter as the guide's reference object."""
    signature = run if isinstance(run, RunSignature) else inspect_run(run)
    properties: dict[str, Any] = {}
    required: list[str] = []
    components: dict[str, Any] = {}
    if signature.data_param is not None:
        data_schema, defs = _schema_with_defs(signature.data_adapter, "validation")
        properties[DATA_KEY] = data_schema
        components.update(defs)
        if signature.data_required:
            required.append(DATA_KEY)
    for param in signature.pool_params:
        properties[param] = json.loads(json.dumps(DATAPOOL_REF_SCHEMA))
        required.append(param)
    body: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    if not required:
        del body["required"]
    try:
        response, response_defs = _schema_with_defs(
            TypeAdapter(signature.return_type), "serialization"
        )
    except pydantic.PydanticSchemaGenerationError:
        response, response_defs = {}, {}
    for name, schema in response_defs.items():
        components.setdefault(name, schema)
    return RequestSchema(body=body, components=components, response=response)


def openapi_document(
    run: Callable[..., Any] | RunSignature,
    *,
    title: str | None = None,
    version: str = "0.1.0",
) -> dict[str, Any]:
    """A whole OpenAPI 3.1 document with one operation: executing the service with `run`'s
    request body."""
    signature = run if isinstance(run, RunSignature) else inspect_run(run)
    schema = request_schema(signature)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title or signature.function_name, "version": version},
        "paths": {
            EXECUTION_PATH: {
                "post": {
                    "operationId": "execute",
                    "summary": f"Execute {signature.function_name} with data and pools",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": schema.body}},
                    },
                    "responses": {
                        "200": {
                            "description": "The JSON result of run()",
                            "content": {"application/json": {"schema": schema.response}},
                        }
                    },
                }
            }
        },
    }
    if schema.components:
        document["components"] = {"schemas": schema.components}
    return document
