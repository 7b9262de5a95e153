"""Data pool access grants: short-lived HS256 JWTs scoped to one pool, application and tenant.

This is the only module that imports `jwt`. Invariants a newcomer must keep:

- The algorithm is pinned to HS256 on both sides. The header's `alg` is looked at only to give
  a precise rejection reason (`alg_none`, `wrong_algorithm`); it never selects the algorithm.
- Every claim (`datapoolId`, `applicationId`, `tenantId`, `permission`, `iat`, `exp`, `jti`) is
  required, with its type checked, before any claim is trusted; the signature is checked
  before any claim is looked at.
- The lifetime is fixed at 15 minutes (`GRANT_LIFETIME_SECONDS`), as the platform guide says.
  A token is reusable until it expires: there is no replay cache, by design.
- The secret lives only inside `GrantSecret`, which refuses fewer than 32 bytes and whose
  repr/str never show the bytes. No log line and no exception message contains the secret or a
  token; rejections carry a typed `RejectReason` and a message made only of claim values.

Telling "tampered" from "bad signature": a signature mismatch alone cannot say why it does not
match, so issued tokens carry a `kid` header, a one-way fingerprint of the secret (HMAC of a
fixed label; it reveals nothing about the secret). When the signature does not verify and the
`kid` is ours, the token was made with our secret and altered afterwards: `tampered`. Otherwise
it was signed with some other key: `bad_signature`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import jwt

__all__ = [
    "ALGORITHM",
    "GRANT_LIFETIME_SECONDS",
    "MIN_SECRET_BYTES",
    "GrantClaims",
    "GrantRejected",
    "GrantSecret",
    "Permission",
    "RejectReason",
    "issue_grant",
    "parse_permission",
    "permission_mode",
    "verify_grant",
]

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
GRANT_LIFETIME_SECONDS = 15 * 60
MIN_SECRET_BYTES = 32
_KID_LABEL = b"poolfs grant key id v1"
_REQUIRED_CLAIMS = ("datapoolId", "applicationId", "tenantId", "permission", "iat", "exp", "jti")

Mode = Literal["ro", "rw"]


class Permission(enum.StrEnum):
    VIEW = "VIEW"
    MODIFY = "MODIFY"


class RejectReason(enum.StrEnum):
    """Why a grant was rejected. Every reason means HTTP 403 to the platform."""

    BAD_SIGNATURE = "bad_signature"
    TAMPERED = "tampered"
    EXPIRED = "expired"
    ALG_NONE = "alg_none"
    WRONG_ALGORITHM = "wrong_algorithm"
    MISSING_CLAIM = "missing_claim"
    BAD_CLAIM_TYPE = "bad_claim_type"
    UNKNOWN_PERMISSION = "unknown_permission"
    POOL_MISMATCH = "pool_mismatch"
    APPLICATION_MISMATCH = "application_mismatch"
    TENANT_MISMATCH = "tenant_mismatch"
    MALFORMED = "malformed"


class GrantRejected(Exception):
    """A grant failed verification. `reason` is typed; `message` is for humans and never
    contains the secret or the token."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"grant rejected ({reason.value}): {message}")
        self.reason = reason
        self.message = message


class GrantSecret:
    """The HMAC key shared by the grant issuer and every mountd. At least 32 bytes.

    Load it from a file (or a systemd credential file) with `from_file`; never pass it on a
    command line. The bytes are reachable only from this module.
    """

    __slots__ = ("__key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes):
            raise TypeError("a grant secret must be bytes")
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"grant secret is too short: {len(key)} bytes, at least "
                f"{MIN_SECRET_BYTES} are required"
            )
        self.__key = key

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> GrantSecret:
        """Read a secret file. One trailing newline (`\\n` or `\\r\\n`) is dropped, since
        `echo` and editors add one; every other byte is part of the secret."""
        with open(path, "rb") as file:
            data = file.read()
        if data.endswith(b"\r\n"):
            data = data[:-2]
        elif data.endswith(b"\n"):
            data = data[:-1]
        try:
            return cls(data)
        except ValueError as exc:
            # Re-raise with the path, which helps, and without the content, which must not show.
            raise ValueError(f"grant secret file {os.fspath(path)!r}: {exc}") from None

    @classmethod
    def generate(cls) -> GrantSecret:
        """A fresh random 32-byte secret (for tests and first-time setup)."""
        return cls(os.urandom(MIN_SECRET_BYTES))

    def key_id(self) -> str:
        """A one-way fingerprint of the secret, used as the JWT `kid` header."""
        digest = hmac.new(self.__key, _KID_LABEL, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:12]).decode("ascii")

    def _key(self) -> bytes:
        return self.__key

    def __repr__(self) -> str:
        return "GrantSecret(<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        # Pickling would copy the bytes somewhere we cannot see; refuse it.
        raise TypeError("GrantSecret cannot be pickled")


@dataclasses.dataclass(frozen=True, slots=True)
class GrantClaims:
    """The verified content of a grant."""

    datapool_id: uuid.UUID
    application_id: uuid.UUID
    tenant_id: str
    permission: Permission
    issued_at: datetime
    expires_at: datetime
    jti: str

    @property
    def mode(self) -> Mode:
        return permission_mode(self.permission)


def parse_permission(value: Permission | str) -> Permission:
    """`VIEW` or `MODIFY` (exact spelling); ValueError names the allowed values otherwise."""
    try:
        return Permission(value)
    except ValueError:
        raise ValueError(f"invalid permission {value!r}: must be VIEW or MODIFY") from None


def permission_mode(permission: Permission | str) -> Mode:
    """VIEW -> read-only ("ro"), MODIFY -> writeable ("rw")."""
    return "rw" if parse_permission(permission) is Permission.MODIFY else "ro"


def _utc_now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now


def _as_uuid(value: uuid.UUID | str, what: str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{what} is not a valid UUID: {value!r}") from None


def issue_grant(
    secret: GrantSecret,
    datapool_id: uuid.UUID | str,
    application_id: uuid.UUID | str,
    tenant_id: uuid.UUID | str,
    permission: Permission | str,
    now: datetime | None = None,
) -> str:
    """Sign a grant valid for 15 minutes from `now` (default: the current time)."""
    pool = _as_uuid(datapool_id, "datapool_id")
    application = _as_uuid(application_id, "application_id")
    tenant = str(tenant_id)
    if not tenant:
        raise ValueError("tenant_id must not be empty")
    perm = parse_permission(permission)
    issued = int(_utc_now(now).timestamp())
    payload = {
        "datapoolId": str(pool),
        "applicationId": str(application),
        "tenantId": tenant,
        "permission": perm.value,
        "iat": issued,
        "exp": issued + GRANT_LIFETIME_SECONDS,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(payload, secret._key(), algorithm=ALGORITHM, headers={"kid": secret.key_id()})


def _b64url_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    raw = base64.urlsafe_b64decode(padded.encode("ascii"))
    return json.loads(raw)


def _reject(reason: RejectReason, message: str) -> GrantRejected:
    log.debug("grant rejected: %s: %s", reason.value, message)
    return GrantRejected(reason, message)


def _read_header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise _reject(RejectReason.MALFORMED, "not a JWT (expected three dot-separated parts)")
    try:
        header = _b64url_json(parts[0])
    except (ValueError, binascii.Error, UnicodeError, RecursionError):
        raise _reject(RejectReason.MALFORMED, "the JWT header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise _reject(RejectReason.MALFORMED, "the JWT header is not a JSON object")
    return header


def _check_algorithm(header: dict[str, Any]) -> None:
    alg = header.get("alg")
    if alg is None:
        raise _reject(RejectReason.MALFORMED, "the JWT header has no 'alg'")
    if not isinstance(alg, str):
        raise _reject(RejectReason.MALFORMED, "the JWT header's 'alg' is not a string")
    if alg.lower() == "none":
        raise _reject(RejectReason.ALG_NONE, "unsigned token (alg 'none') refused")
    if alg != ALGORITHM:
        raise _reject(
            RejectReason.WRONG_ALGORITHM, f"algorithm {alg!r} refused, only {ALGORITHM} is accepted"
        )


def _verified_payload(secret: GrantSecret, token: str, header: dict[str, Any]) -> dict[str, Any]:
    try:
        decoded = jwt.PyJWS().decode_complete(
            token,
            secret._key(),
            algorithms=[ALGORITHM],
            options={"verify_signature": True, "enforce_minimum_key_length": True},
        )
    except jwt.InvalidSignatureError:
        if header.get("kid") == secret.key_id():
            raise _reject(
                RejectReason.TAMPERED,
                "the token was signed with this platform's secret but altered afterwards",
            ) from None
        raise _reject(
            RejectReason.BAD_SIGNATURE, "the signature does not verify with this platform's secret"
        ) from None
    except jwt.InvalidTokenError as exc:
        raise _reject(RejectReason.MALFORMED, f"unreadable token: {exc}") from None
    try:
        payload = json.loads(decoded["payload"])
    except (ValueError, UnicodeError, RecursionError):
        raise _reject(RejectReason.MALFORMED, "the JWT payload is not JSON") from None
    if not isinstance(payload, dict):
        raise _reject(RejectReason.MALFORMED, "the JWT payload is not a JSON object")
    return payload


def _try_uuid(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _claims_from_payload(payload: dict[str, Any]) -> GrantClaims:
    missing = [name for name in _REQUIRED_CLAIMS if name not in payload]
    if missing:
        raise _reject(RejectReason.MISSING_CLAIM, f"missing claim(s): {', '.join(missing)}")
    wrong: list[str] = []
    ids: dict[str, uuid.UUID] = {}
    for name in ("datapoolId", "applicationId"):
        parsed = _try_uuid(payload[name])
        if parsed is None:
            wrong.append(f"{name} must be a UUID string")
        else:
            ids[name] = parsed
    for name in ("tenantId", "jti"):
        if not isinstance(payload[name], str) or not payload[name]:
            wrong.append(f"{name} must be a non-empty string")
    if not isinstance(payload["permission"], str):
        wrong.append("permission must be a string")
    for name in ("iat", "exp"):
        if not _is_number(payload[name]):
            wrong.append(f"{name} must be a number (seconds since the epoch)")
    if wrong:
        raise _reject(RejectReason.BAD_CLAIM_TYPE, "; ".join(wrong))
    try:
        permission = Permission(payload["permission"])
    except ValueError:
        raise _reject(
            RejectReason.UNKNOWN_PERMISSION,
            f"permission {payload['permission']!r} is not VIEW or MODIFY",
        ) from None
    try:
        issued_at = datetime.fromtimestamp(payload["iat"], UTC)
        expires_at = datetime.fromtimestamp(payload["exp"], UTC)
    except (OverflowError, OSError, ValueError):
        raise _reject(RejectReason.BAD_CLAIM_TYPE, "iat or exp is out of range") from None
    return GrantClaims(
        datapool_id=ids["datapoolId"],
        application_id=ids["applicationId"],
        tenant_id=payload["tenantId"],
        permission=permission,
        issued_at=issued_at,
        expires_at=expires_at,
        jti=payload["jti"],
    )


def verify_grant(
    secret: GrantSecret,
    token: str,
    *,
    datapool_id: uuid.UUID | str,
    application_id: uuid.UUID | str,
    tenant_id: uuid.UUID | str,
    now: datetime | None = None,
) -> GrantClaims:
    """Verify a grant for one mount request; GrantRejected (with a typed reason) otherwise.

    Checks, in order: structure, algorithm (HS256 only), signature, every claim present and
    well-typed, permission, expiry, then pool, application and tenant against the request.
    """
    pool = _as_uuid(datapool_id, "datapool_id")
    application = _as_uuid(application_id, "application_id")
    tenant = str(tenant_id)
    current = _utc_now(now)
    if not isinstance(token, str):
        raise _reject(RejectReason.MALFORMED, "the token must be a string")
    header = _read_header(token)
    _check_algorithm(header)
    claims = _claims_from_payload(_verified_payload(secret, token, header))
    if current >= claims.expires_at:
        raise _reject(RejectReason.EXPIRED, f"the grant expired at {claims.expires_at.isoformat()}")
    if claims.datapool_id != pool:
        raise _reject(
            RejectReason.POOL_MISMATCH,
            f"the grant is for data pool {claims.datapool_id}, not {pool}",
        )
    if claims.application_id != application:
        raise _reject(
            RejectReason.APPLICATION_MISMATCH,
            f"the grant is for application {claims.application_id}, not {application}",
        )
    if claims.tenant_id != tenant:
        raise _reject(
            RejectReason.TENANT_MISMATCH,
            f"the grant is for tenant {claims.tenant_id!r}, not {tenant!r}",
        )
    return claims
