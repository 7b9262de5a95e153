"""The HTTP API's request and response bodies (camelCase on the wire, as the platform guide).

These models are the OpenAPI schema: change them and the served document changes with them.
"""

from __future__ import annotations

import copy
import enum
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from poolfs.catalog import TENANT_PATTERN
from poolfs.grants import Permission
from poolfs.refs import DATA_KEY, DATAPOOL_REF_SCHEMA

__all__ = [
    "EXECUTION_ID_PATTERN",
    "EndReason",
    "ErrorResponse",
    "ExecutionInfo",
    "ExecutionList",
    "ExecutionRequest",
    "ExecutionState",
    "GrantRequest",
    "GrantResponse",
    "Health",
    "MountInfo",
    "MountState",
    "Problem",
]

# Execution ids name a directory: letters, digits, `_.-`, starting with a letter or digit
# (UUIDs fit), so no id can be `.`, `..` or contain `/`.
EXECUTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"


EndReason = Literal["deleted", "expired", "shutdown"]


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Problem(_Model):
    """One thing wrong with a request: where (dotted, e.g. `body.my_dataset.id`) and what."""

    location: str
    message: str


class ErrorResponse(_Model):
    """Every error: a sentence, plus a machine-readable reason for 403s and the list of
    problems for 400s."""

    detail: str
    reason: str | None = None
    param: str | None = None
    problems: list[Problem] | None = None


class GrantRequest(_Model):
    application_id: uuid.UUID = Field(description="The application that will run executions.")
    permission: Permission = Field(description="VIEW (read-only) or MODIFY (read-write).")


class GrantResponse(_Model):
    token: str = Field(description="HS256 JWT, valid 15 minutes, reusable until then.")


def _body_schema(schema: dict[str, Any]) -> None:
    schema.clear()
    schema.update(
        {
            "type": "object",
            "description": "The service execution body: `data` (any JSON) and one DataPool "
            "reference per DataPool parameter of run(), keyed by the parameter name.",
            "properties": {DATA_KEY: {"description": "run()'s data argument"}},
            "additionalProperties": copy.deepcopy(DATAPOOL_REF_SCHEMA),
        }
    )


class ExecutionRequest(_Model):
    execution_id: str = Field(
        pattern=EXECUTION_ID_PATTERN,
        description="The execution's id; its pools are mounted at "
        "<mount_root>/<executionId>/<param>.",
    )
    application_id: uuid.UUID
    creator_tenant_id: str = Field(
        pattern=f"^{TENANT_PATTERN}$", description="The tenant that created the application."
    )
    body: dict[str, Any] = Field(json_schema_extra=_body_schema)


class ExecutionState(enum.StrEnum):
    MOUNTING = "mounting"
    MOUNTED = "mounted"
    UNMOUNTING = "unmounting"
    UNMOUNTED = "unmounted"


class MountState(enum.StrEnum):
    STARTING = "starting"
    MOUNTED = "mounted"
    STOPPING = "stopping"
    # The worker died; the mountpoint was detached and removed.
    DIED = "died"
    UNMOUNTED = "unmounted"


class MountInfo(_Model):
    pool_id: uuid.UUID
    path: str
    mode: Literal["ro", "rw"]
    access: Literal["grant", "role"] = Field(
        description="What decided the mode: a verified grant, or the creator's own role."
    )
    state: MountState
    worker_pid: int | None = None
    exit_code: int | None = None


class ExecutionInfo(_Model):
    execution_id: str
    application_id: uuid.UUID
    creator_tenant_id: str
    state: ExecutionState
    failed: bool = Field(
        description="A worker died, an unmount had to be forced, or an upload failed; "
        "`errors` says which."
    )
    errors: list[str]
    created_at: datetime
    expires_at: datetime
    finished_at: datetime | None = None
    end_reason: EndReason | None = None
    mounts: dict[str, MountInfo]


class ExecutionList(_Model):
    executions: list[ExecutionInfo]


class Health(_Model):
    status: Literal["ok", "stopping"]
    executions: int
    mounts: int
