"""Access decisions: may this execution mount this pool, and how (read-only or writeable)?

The rules (platform guide, "Data Pool Access Grants"):

- The pool must be in the catalog, or nothing else is looked at (UnknownPool -> 404).
- With a grant on the reference, only the grant decides: it must verify (signature, expiry,
  every claim) and name this pool, this application and the application creator's tenant.
  VIEW -> read-only, MODIFY -> writeable. The creator's own role is not consulted at all.
- Without a grant, the creator's own role decides: VIEWER -> read-only; MAINTAINER or OWNER ->
  writeable; no role -> AccessDenied.
- Creating a grant needs VIEWER for VIEW and MAINTAINER for MODIFY; the grant carries the
  caller's tenant, so it is usable only by executions whose creator is that tenant.

Every refusal carries a machine-readable `reason` (a poolfs.grants.RejectReason value, or
`no_role` / `insufficient_role`) and a message without secrets or tokens.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime
from typing import Literal

from poolfs.catalog import Catalog, PoolNotFound, Role, role_at_least
from poolfs.grants import (
    GrantRejected,
    GrantSecret,
    Permission,
    issue_grant,
    permission_mode,
    verify_grant,
)
from poolfs.refs import DataPoolRef

__all__ = [
    "AccessDenied",
    "Decision",
    "UnknownPool",
    "authorize_grant_request",
    "decide_mount",
]

Mode = Literal["ro", "rw"]
NO_ROLE = "no_role"
INSUFFICIENT_ROLE = "insufficient_role"


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """How one parameter's pool may be mounted, and on what authority."""

    param: str
    pool_id: uuid.UUID
    mode: Mode
    # "grant" (a verified grant decided) or "role" (the creator's own role decided).
    source: Literal["grant", "role"]
    detail: str


class AccessDenied(Exception):
    """403: the request may not have this access. `reason` is machine-readable."""

    def __init__(self, reason: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.param = param


class UnknownPool(Exception):
    """404: no such pool in the catalog."""

    def __init__(self, pool_id: uuid.UUID, param: str | None = None) -> None:
        where = f"{param!r}: " if param else ""
        super().__init__(f"{where}data pool {pool_id} not found")
        self.pool_id = pool_id
        self.param = param


def decide_mount(
    catalog: Catalog,
    secret: GrantSecret,
    *,
    param: str,
    ref: DataPoolRef,
    application_id: uuid.UUID,
    creator_tenant: str,
    now: datetime | None = None,
) -> Decision:
    """The mode to mount `ref` in for an execution of `application_id` created by
    `creator_tenant`; UnknownPool or AccessDenied otherwise (module docstring)."""
    if ref.grant is not None:
        if not catalog.exists(ref.id):
            raise UnknownPool(ref.id, param)
        try:
            claims = verify_grant(
                secret,
                ref.grant,
                datapool_id=ref.id,
                application_id=application_id,
                tenant_id=creator_tenant,
                now=now,
            )
        except GrantRejected as exc:
            raise AccessDenied(
                exc.reason.value, f"{param!r}: grant rejected: {exc.message}", param
            ) from None
        return Decision(
            param,
            ref.id,
            claims.mode,
            "grant",
            f"{claims.permission.value} grant {claims.jti} (expires {claims.expires_at:%H:%M:%SZ})",
        )
    try:
        role = catalog.role_of(ref.id, creator_tenant)
    except PoolNotFound:
        raise UnknownPool(ref.id, param) from None
    if role is None:
        raise AccessDenied(
            NO_ROLE,
            f"{param!r}: tenant {creator_tenant!r} (the application creator) has no role on "
            f"data pool {ref.id} and the reference carries no grant",
            param,
        )
    mode: Mode = "rw" if role_at_least(role, Role.MAINTAINER) else "ro"
    return Decision(param, ref.id, mode, "role", f"creator role {role.value}")


def authorize_grant_request(
    catalog: Catalog,
    secret: GrantSecret,
    *,
    pool_id: uuid.UUID,
    application_id: uuid.UUID,
    tenant: str,
    permission: Permission,
    now: datetime | None = None,
) -> str:
    """A grant token for `tenant` if its role allows `permission` on the pool.

    UnknownPool (404) if the pool is unknown; AccessDenied (403) if the role is too weak.
    """
    try:
        role = catalog.role_of(pool_id, tenant)
    except PoolNotFound:
        raise UnknownPool(pool_id) from None
    needed = Role.MAINTAINER if permission_mode(permission) == "rw" else Role.VIEWER
    if not role_at_least(role, needed):
        has = role.value if role is not None else "no role"
        raise AccessDenied(
            INSUFFICIENT_ROLE,
            f"a {permission.value} grant needs {needed.value} or stronger on data pool "
            f"{pool_id}; tenant {tenant!r} has {has}",
        )
    return issue_grant(secret, pool_id, application_id, tenant, permission, now=now)
