"""The pool catalog: pool records kept in the store itself, under `.poolfs/catalog/`.

A store ROOT (`file:///srv/pools`, `s3://bucket` or `s3://bucket/prefix`) holds every pool at
`<root>/<pool id>/` and the catalog beside them, so every node that reaches the store sees the
same catalog with no extra database. Keys below the store root:

    <id>/                                   the pool root marker; the pool's files live below
    .poolfs/catalog/<id>/pool.json          {"id", "name", "owner", "created"}: written once
    .poolfs/catalog/<id>/members/<tenant>   {"tenant", "role", "updated"}: one object a member

Invariants a newcomer must keep:

- One object per membership. `share` is a single atomic PUT (and a revoke a single DELETE), so
  two nodes changing different members of one pool at once never lose each other's change:
  there is no read-modify-write of a shared document. Changing the SAME member from two nodes
  at once: the last PUT wins.
- The owner's role is OWNER, always, and comes from `pool.json` alone; a membership object for
  the owner is refused, so the owner can never be demoted by accident.
- `pool.json` is written after the pool root marker: a catalog entry never names a pool whose
  root is missing (a crash in between leaves an unlisted empty pool root, which is harmless).
- Records hold no URL: a pool's location is derived (`<root>/<id>`), so the catalog stays valid
  when another node reaches the same store through another URL (endpoint, NFS path).
- Tenant ids match `TENANT_PATTERN` (alphanumeric first, then `A-Za-z0-9._@:-`, at most 128),
  so each one is a single key component as it is: no escaping, no `.`/`..`, no `/`.
- Reads are never cached: a role changed on one node counts for the next access decision on
  every node. Writing the catalog needs only store credentials; whoever can write the store
  administers its catalog (mountd exposes no catalog writes).
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from poolfs.stores import NotFound, Store, StoreOptions, open_store, parse_store_url

__all__ = [
    "CATALOG_PREFIX",
    "TENANT_PATTERN",
    "Catalog",
    "CatalogError",
    "PoolNotFound",
    "PoolRecord",
    "Role",
    "check_tenant",
    "parse_role",
    "role_at_least",
]

CATALOG_PREFIX = ".poolfs/catalog/"
TENANT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@:\-]{0,127}"
_TENANT_RE = re.compile(TENANT_PATTERN)
_NAME_MAX = 200


class Role(enum.StrEnum):
    """A tenant's role on a pool, weakest first."""

    VIEWER = "VIEWER"
    MAINTAINER = "MAINTAINER"
    OWNER = "OWNER"


_RANK = {Role.VIEWER: 1, Role.MAINTAINER: 2, Role.OWNER: 3}


def role_at_least(role: Role | None, needed: Role) -> bool:
    """Whether `role` (None: no role at all) is `needed` or stronger."""
    return role is not None and _RANK[role] >= _RANK[needed]


def parse_role(value: str) -> Role:
    """VIEWER, MAINTAINER or OWNER (any case); ValueError names the allowed values otherwise."""
    try:
        return Role(value.upper())
    except ValueError:
        raise ValueError(f"invalid role {value!r}: must be VIEWER, MAINTAINER or OWNER") from None


class CatalogError(ValueError):
    """A catalog request that cannot be carried out as asked (bad tenant, name, role)."""


class PoolNotFound(LookupError):
    """No pool with this id in the catalog."""

    def __init__(self, pool_id: uuid.UUID) -> None:
        super().__init__(f"data pool {pool_id} not found")
        self.pool_id = pool_id


def check_tenant(tenant: str) -> str:
    """`tenant` itself if it is a valid tenant id; CatalogError otherwise."""
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise CatalogError(
            f"invalid tenant id {tenant!r}: 1-128 characters of A-Z a-z 0-9 . _ @ : -, "
            "starting with a letter or digit"
        )
    return tenant


class PoolRecord(BaseModel):
    """One pool as the catalog knows it. `members` excludes the owner (who is always OWNER)."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    name: str
    owner: str
    created: datetime
    members: dict[str, Role] = {}

    def role_of(self, tenant: str) -> Role | None:
        if tenant == self.owner:
            return Role.OWNER
        return self.members.get(tenant)


class _PoolFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: uuid.UUID
    name: str
    owner: str
    created: datetime


class _MemberFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tenant: str
    role: Role


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value)
    except ValueError:
        raise CatalogError(f"invalid pool id {value!r}: not a UUID") from None


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")


class Catalog:
    """The catalog of the store rooted at `root_url`; see the module docstring.

    `store` must be the store ROOT (the one whose keys are `<id>/...` and `.poolfs/...`);
    `options` are what pool stores are opened with (`pool_store`).
    """

    def __init__(self, store: Store, root_url: str, options: StoreOptions | None = None) -> None:
        self.store = store
        self.root_url = root_url.rstrip("/")
        self.options = options or StoreOptions()

    @classmethod
    def open(cls, root_url: str, options: StoreOptions | None = None) -> Catalog:
        """The catalog of the store root at `root_url` (InvalidStoreURL if malformed)."""
        parse_store_url(root_url)
        return cls(open_store(root_url, options), root_url, options)

    def close(self) -> None:
        self.store.close()

    # --- keys --------------------------------------------------------------------------------

    @staticmethod
    def _pool_key(pool_id: uuid.UUID) -> str:
        return f"{CATALOG_PREFIX}{pool_id}/pool.json"

    @staticmethod
    def _members_prefix(pool_id: uuid.UUID) -> str:
        return f"{CATALOG_PREFIX}{pool_id}/members/"

    def pool_url(self, pool_id: uuid.UUID | str) -> str:
        """The URL `poolfs mount` takes for this pool: `<root>/<id>`."""
        return f"{self.root_url}/{_as_uuid(pool_id)}"

    def pool_store(self, pool_id: uuid.UUID | str) -> Store:
        """The store of one pool (keys relative to the pool root)."""
        return open_store(self.pool_url(pool_id), self.options)

    # --- reads -------------------------------------------------------------------------------

    def _read(self, key: str) -> bytes:
        data, _ = self.store.get_range(key, 0, None)
        return data

    def _pool_file(self, pool_id: uuid.UUID) -> _PoolFile:
        try:
            raw = self._read(self._pool_key(pool_id))
        except NotFound:
            raise PoolNotFound(pool_id) from None
        try:
            return _PoolFile.model_validate_json(raw)
        except ValidationError as exc:
            raise CatalogError(f"catalog record of pool {pool_id} is damaged: {exc}") from exc

    def exists(self, pool_id: uuid.UUID | str) -> bool:
        try:
            self._pool_file(_as_uuid(pool_id))
        except PoolNotFound:
            return False
        return True

    def get(self, pool_id: uuid.UUID | str) -> PoolRecord:
        """The pool's record with all its members; PoolNotFound if there is none."""
        pid = _as_uuid(pool_id)
        pool = self._pool_file(pid)
        return PoolRecord(
            id=pool.id,
            name=pool.name,
            owner=pool.owner,
            created=pool.created,
            members=dict(self._members(pid)),
        )

    def _members(self, pool_id: uuid.UUID) -> Iterator[tuple[str, Role]]:
        prefix = self._members_prefix(pool_id)
        for page in self.store.list_pages(prefix, None):
            for obj in page.objects:
                tenant = obj.key[len(prefix) :]
                if not tenant or "/" in tenant:
                    continue
                try:
                    member = _MemberFile.model_validate_json(self._read(obj.key))
                except NotFound:
                    continue  # revoked while we listed
                except ValidationError:
                    continue  # damaged membership objects grant nothing
                if member.tenant == tenant:
                    yield tenant, member.role

    def role_of(self, pool_id: uuid.UUID | str, tenant: str) -> Role | None:
        """`tenant`'s role on the pool (None: none); PoolNotFound if the pool is unknown.

        Two small reads (the pool record and one membership object), no listing: this is the
        access decision's hot path.
        """
        pid = _as_uuid(pool_id)
        pool = self._pool_file(pid)
        if tenant == pool.owner:
            return Role.OWNER
        if not _TENANT_RE.fullmatch(tenant):
            return None
        try:
            raw = self._read(self._members_prefix(pid) + tenant)
        except NotFound:
            return None
        try:
            member = _MemberFile.model_validate_json(raw)
        except ValidationError:
            return None
        return member.role if member.tenant == tenant else None

    def list(self) -> list[PoolRecord]:
        """Every pool in the catalog, oldest first (then by id)."""
        ids: list[uuid.UUID] = []
        for page in self.store.list_pages(CATALOG_PREFIX, "/"):
            for prefix in page.prefixes:
                name = prefix[len(CATALOG_PREFIX) :].rstrip("/")
                try:
                    ids.append(uuid.UUID(name))
                except ValueError:
                    continue
        records = []
        for pid in ids:
            try:
                records.append(self.get(pid))
            except (PoolNotFound, CatalogError):
                continue  # half-created (no pool.json) or damaged: not a pool
        return sorted(records, key=lambda r: (r.created, str(r.id)))

    # --- writes ------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        owner: str,
        *,
        pool_id: uuid.UUID | None = None,
        now: datetime | None = None,
    ) -> PoolRecord:
        """Create an empty pool owned by `owner`; returns its record (with a fresh UUID)."""
        check_tenant(owner)
        if not name or len(name) > _NAME_MAX or any(ord(c) < 32 for c in name):
            raise CatalogError(f"invalid pool name {name!r}: 1-{_NAME_MAX} printable characters")
        pid = pool_id or uuid.uuid4()
        if self.exists(pid):
            raise CatalogError(f"data pool {pid} already exists")
        created = _now(now)
        # The pool root first: a listed pool always has its root (module docstring).
        self.store.put_bytes(f"{pid}/", b"", {})
        record = PoolRecord(id=pid, name=name, owner=owner, created=created)
        self.store.put_bytes(
            self._pool_key(pid),
            _json({"id": str(pid), "name": name, "owner": owner, "created": created.isoformat()}),
            {},
        )
        return record

    def share(
        self,
        pool_id: uuid.UUID | str,
        tenant: str,
        role: Role | None,
        *,
        now: datetime | None = None,
    ) -> PoolRecord:
        """Give `tenant` `role` on the pool (replacing any role it had); None revokes.

        The owner's role cannot be changed. Returns the updated record.
        """
        pid = _as_uuid(pool_id)
        check_tenant(tenant)
        pool = self._pool_file(pid)
        if tenant == pool.owner:
            raise CatalogError(
                f"tenant {tenant!r} owns data pool {pid}; the owner's role is always OWNER"
            )
        key = self._members_prefix(pid) + tenant
        if role is None:
            self.store.delete(key)
        else:
            stamp = _now(now).isoformat()
            body = {"tenant": tenant, "role": Role(role).value, "updated": stamp}
            self.store.put_bytes(key, _json(body), {})
        return self.get(pid)
