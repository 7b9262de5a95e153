"""Running a service's `run()` with its data pools mounted.

`execute(run, body, mounter)` is what an execution node does: parse the body, mount each
referenced pool through a `Mounter`, inject `DataPool` objects, call `run`, return its result
as JSON. `run_local(run, input_dir)` is the guide's local testing without hand-written glue.

Invariants:
- Nothing is mounted before the whole body is valid (a bad body mounts nothing).
- Every pool that was mounted is unmounted, in reverse order, whatever happens: `run` raising,
  a later mount failing, the result not being JSON. All unmounts are attempted even if one fails.
- An unmount failure is an error of the execution (unmount is where writes become durable),
  unless the execution already failed: then the unmount failure is attached as a note to the
  original exception, which is what propagates (and what the caller logs, once).
- The library reads no environment: `OUTPUT_DIRECTORY_ENV` is named here, the CLI sets it.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, Protocol
from uuid import UUID

import pydantic_core

from poolfs.datapool import DataPool
from poolfs.refs import (
    DataPoolRef,
    ExecutionRequest,
    RunSignature,
    inspect_run,
    parse_execution_body,
    validate_data,
)

__all__ = [
    "OUTPUT_DIRECTORY_ENV",
    "CliMounter",
    "LocalDirMounter",
    "LocalRunError",
    "Mode",
    "Mount",
    "MountError",
    "Mounter",
    "ResultNotSerializable",
    "UnmountError",
    "call_run",
    "execute",
    "mounted_pools",
    "result_to_json",
    "run_local",
]

log = logging.getLogger(__name__)

# The environment variable naming the directory a service writes its output files to.
OUTPUT_DIRECTORY_ENV = "OUTPUT_DIRECTORY"

Mode = Literal["ro", "rw"]
ModeFor = Callable[[str, DataPoolRef], Mode]


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    """A mounted pool: where it is and whether it is writeable."""

    param_name: str
    pool_id: UUID
    path: str
    mode: Mode


class Mounter(Protocol):
    """Mounts pools for one execution. `mount` returns only once the pool is usable at
    `Mount.path`; `unmount` returns only once written files are durable."""

    def mount(self, param_name: str, ref: DataPoolRef) -> Mount: ...

    def unmount(self, mount: Mount) -> None: ...


class MountError(RuntimeError):
    """A pool could not be mounted; the message names the parameter, the pool and why."""


class UnmountError(RuntimeError):
    """A pool could not be unmounted cleanly (its writes may not be durable)."""


class ResultNotSerializable(TypeError):
    """`run` returned something that cannot be converted to JSON."""


class LocalRunError(ValueError):
    """`run_local` cannot start: missing input files or directories, or invalid data."""


def result_to_json(result: Any) -> str:
    """The JSON text of a run() result (pydantic models, dataclasses, UUIDs, datetimes ok)."""
    try:
        return pydantic_core.to_json(result).decode("utf-8")
    except pydantic_core.PydanticSerializationError as exc:
        raise ResultNotSerializable(f"run() returned a value that is not JSON: {exc}") from exc


def call_run(
    run: Callable[..., Any],
    signature: RunSignature,
    request: ExecutionRequest,
    pools: Mapping[str, DataPool],
) -> Any:
    """Call `run` with the request's data and the given DataPool objects, by keyword."""
    kwargs: dict[str, Any] = dict(pools)
    if signature.data_param is not None and request.has_data:
        kwargs[signature.data_param] = request.data
    return run(**kwargs)


def _unmount_all(mounter: Mounter, mounts: list[Mount], failure: BaseException | None) -> None:
    errors: list[BaseException] = []
    for mount in reversed(mounts):
        try:
            mounter.unmount(mount)
        except Exception as exc:
            errors.append(exc)
            if failure is not None:
                # The execution already failed; that error propagates, carrying this one.
                failure.add_note(
                    f"also, unmounting {mount.param_name!r} (pool {mount.pool_id}) at "
                    f"{mount.path} failed: {exc}"
                )
    if errors and failure is None:
        first = errors[0]
        for other in errors[1:]:
            first.add_note(f"also: {other}")
        raise first


@contextmanager
def mounted_pools(
    refs: Mapping[str, DataPoolRef], mounter: Mounter
) -> Iterator[dict[str, DataPool]]:
    """Mount every reference, yield DataPool objects by parameter name, unmount them all."""
    mounts: list[Mount] = []
    try:
        pools: dict[str, DataPool] = {}
        for param, ref in refs.items():
            mount = mounter.mount(param, ref)
            mounts.append(mount)
            pools[param] = DataPool(mount.path, name=param)
        yield pools
    except BaseException as exc:
        _unmount_all(mounter, mounts, exc)
        raise
    _unmount_all(mounter, mounts, None)


def execute(
    run: Callable[..., Any], body: Mapping[str, Any] | str | bytes, mounter: Mounter
) -> str:
    """Run `run` for one execution body with its pools mounted; the result as JSON text.

    ExecutionBodyError if the body does not fit `run` (nothing is mounted then); MountError /
    UnmountError from the mounter; whatever `run` raises, after every pool is unmounted.
    """
    signature = inspect_run(run)
    request = parse_execution_body(signature, body)
    with mounted_pools(request.refs, mounter) as pools:
        return result_to_json(call_run(run, signature, request, pools))


def run_local(run: Callable[..., Any], input_dir: str | os.PathLike[str]) -> str:
    """The guide's local test: data from `<input_dir>/data.json`, each DataPool parameter
    bound to `<input_dir>/<param_name>/`. The result as JSON text.

    LocalRunError lists every missing file or directory and every data problem at once.
    `data.json` is needed only when run() has a data parameter without a default.
    """
    signature = inspect_run(run)
    root = os.path.abspath(os.fspath(input_dir))
    problems: list[str] = []
    data_file = os.path.join(root, "data.json")
    request = ExecutionRequest(data=None, has_data=False, refs={})
    if signature.data_param is not None:
        if os.path.isfile(data_file):
            try:
                with open(data_file, encoding="utf-8") as file:
                    raw = json.load(file)
            except ValueError as exc:
                problems.append(f"{data_file}: not valid JSON: {exc}")
            else:
                data, data_problems = validate_data(signature, raw, location="")
                problems.extend(
                    f"{data_file}: {p.location or '(top)'}: {p.message}" for p in data_problems
                )
                request = ExecutionRequest(data=data, has_data=True, refs={})
        elif signature.data_required:
            problems.append(
                f"{data_file} is missing: it holds the `data` argument of "
                f"{signature.function_name} as JSON"
            )
    pools: dict[str, DataPool] = {}
    for param in signature.pool_params:
        directory = os.path.join(root, param)
        if os.path.isdir(directory):
            pools[param] = DataPool(directory, name=param)
        else:
            problems.append(
                f"{directory}{os.sep} is missing: create it for the DataPool parameter {param!r}"
            )
    if problems:
        raise LocalRunError(
            "cannot run locally:\n" + "\n".join(f"  - {problem}" for problem in problems)
        )
    return result_to_json(call_run(run, signature, request, pools))


class LocalDirMounter:
    """A mounter over plain local directories, keyed by pool id: for tests and local runs.

    Nothing is mounted: `mount` hands out the directory. The mode is reported, not enforced.
    `active` lists what is currently "mounted", so tests can check that everything was undone.
    """

    def __init__(
        self,
        pools: Mapping[UUID, str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]],
        mode: Mode | ModeFor = "rw",
    ) -> None:
        self._pools = {
            _as_uuid(pool_id): os.path.abspath(os.fspath(path)) for pool_id, path in pools.items()
        }
        self._mode = mode
        self.active: list[Mount] = []

    def mount(self, param_name: str, ref: DataPoolRef) -> Mount:
        path = self._pools.get(ref.id)
        if path is None:
            raise MountError(f"{param_name!r}: no local directory for data pool {ref.id}")
        if not os.path.isdir(path):
            raise MountError(
                f"{param_name!r}: directory {path!r} for data pool {ref.id} does not exist"
            )
        mode = (
            self._mode
            if isinstance(self._mode, str)
            else _checked_mode(self._mode(param_name, ref))
        )
        mount = Mount(param_name=param_name, pool_id=ref.id, path=path, mode=mode)
        self.active.append(mount)
        return mount

    def unmount(self, mount: Mount) -> None:
        try:
            self.active.remove(mount)
        except ValueError:
            raise UnmountError(
                f"{mount.param_name!r} (pool {mount.pool_id}) is not mounted"
            ) from None


def _as_uuid(value: UUID | str) -> UUID:
    return value if isinstance(value, UUID) else UUID(value)


def _checked_mode(mode: str) -> Mode:
    if mode == "ro":
        return "ro"
    if mode == "rw":
        return "rw"
    raise ValueError(f"mode must be 'ro' or 'rw', got {mode!r}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


class CliMounter:
    """Mounts each pool with the poolfs CLI: `poolfs mount <store>/<pool id> <mountpoint>`.

    `store_url` is the store holding the pools (`file:///abs/dir`, `s3://bucket/prefix`); the pool
    with id P is mounted from `<store_url>/<P>`. Mountpoints are `<mount_root>/<param_name>`,
    created for the mount and removed after it, so one CliMounter (or one mount root) serves one
    execution at a time. `mode_for(param_name, ref)` decides "ro" or "rw" (`--read-only`).

    `mount_args` are passed on to every `poolfs mount` (e.g. `--endpoint-url URL` for S3,
    `--spill-dir DIR`). The CLI is run as `<python> -m poolfs` (default: this interpreter).
    `poolfs mount` exits 0 once the mount is ready and non-zero with a one-line reason
    otherwise; its output goes to a file, not a pipe, because the mount worker it leaves behind
    may keep inherited descriptors open and a pipe would then never reach end-of-file.
    """

    def __init__(
        self,
        store_url: str,
        mount_root: str | os.PathLike[str],
        mode_for: ModeFor,
        *,
        timeout: float = 120.0,
        python: str | None = None,
        mount_args: Sequence[str] = (),
    ) -> None:
        if not store_url:
            raise ValueError("store_url must not be empty")
        self._store_url = store_url.rstrip("/")
        self._mount_root = os.path.abspath(os.fspath(mount_root))
        self._mode_for = mode_for
        self._timeout = timeout
        self._python = python or sys.executable
        self._mount_args = tuple(mount_args)

    def pool_url(self, ref: DataPoolRef) -> str:
        return f"{self._store_url}/{ref.id}"

    def _poolfs(self, *args: str) -> tuple[int, str]:
        """Run `poolfs ARGS`: (exit code, stderr text); exit code -1 means it timed out."""
        command = [self._python, "-m", "poolfs", *args]
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
            try:
                completed = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    timeout=self._timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                return -1, f"timed out after {self._timeout:g} s"
            err.seek(0)
            return completed.returncode, err.read()

    def mount(self, param_name: str, ref: DataPoolRef) -> Mount:
        mode = _checked_mode(self._mode_for(param_name, ref))
        mountpoint = os.path.join(self._mount_root, param_name)
        os.makedirs(self._mount_root, exist_ok=True)
        try:
            os.mkdir(mountpoint)
        except FileExistsError:
            if os.path.ismount(mountpoint) or os.listdir(mountpoint):
                raise MountError(
                    f"{param_name!r}: mountpoint {mountpoint} is busy (mounted or not empty)"
                ) from None
        args = ["mount", self.pool_url(ref), mountpoint, *self._mount_args]
        if mode == "ro":
            args.append("--read-only")
        code, stderr = self._poolfs(*args)
        if code != 0:
            if code == -1:
                # It may have mounted after all; do not leave it behind.
                self._poolfs("umount", mountpoint)
            self._remove_mountpoint(mountpoint)
            raise MountError(
                f"{param_name!r}: mounting data pool {ref.id} failed: {_last_line(stderr)}"
            )
        return Mount(param_name=param_name, pool_id=ref.id, path=mountpoint, mode=mode)

    def unmount(self, mount: Mount) -> None:
        code, stderr = self._poolfs("umount", mount.path)
        if code != 0:
            raise UnmountError(
                f"{mount.param_name!r}: unmounting data pool {mount.pool_id} at {mount.path} "
                f"failed: {_last_line(stderr)}"
            )
        self._remove_mountpoint(mount.path)

    @staticmethod
    def _remove_mountpoint(path: str) -> None:
        try:
            os.rmdir(path)
        except OSError as exc:
            log.info("leaving mountpoint %s in place: %s", path, exc)


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix stream socket (mountd's API socket)."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _mountd_error(status: int, payload: Any) -> str:
    if not isinstance(payload, dict):
        return f"HTTP {status}"
    text = f"HTTP {status}: {payload.get('detail', 'error')}"
    if payload.get("reason"):
        text += f" (reason: {payload['reason']})"
    for problem in payload.get("problems") or []:
        text += f"\n  - {problem.get('location')}: {problem.get('message')}"
    return text


class MountdMounter:
    """Mounts one execution's pools through mountd, over its Unix socket.

    `body` is the execution body (the same one given to `execute`). The first `mount` asks
    mountd to mount every DataPool reference in it at once (`POST /executions`): mountd makes
    the access decisions (grant, or the creator tenant's role), mounts all or nothing, and
    answers with each parameter's path and mode; later `mount` calls hand those out. When the
    last mount handed out is unmounted, the execution is deleted (`DELETE /executions/{id}`),
    which returns once everything is flushed and unmounted; any upload failure mountd reports
    raises UnmountError. One MountdMounter serves one execution, once.

    mountd trusts whoever can connect to its socket, so no identity is sent besides the
    creator tenant in the request.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        execution_id: str,
        application_id: UUID | str,
        creator_tenant_id: str,
        body: Mapping[str, Any],
        timeout: float = 900.0,
    ) -> None:
        self._socket_path = os.fspath(socket_path)
        self._execution_id = execution_id
        self._application_id = str(_as_uuid(application_id))
        self._creator = creator_tenant_id
        self._body = dict(body)
        self._timeout = timeout
        self._mounts: dict[str, Mount] | None = None
        self._handed_out: list[Mount] = []
        self._deleted = False

    @property
    def execution_id(self) -> str:
        return self._execution_id

    def _request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> tuple[int, Any]:
        connection = _UnixHTTPConnection(self._socket_path, self._timeout)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if payload is not None:
                data = json.dumps(payload).encode("utf-8")
                headers["Content-Type"] = "application/json"
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode("utf-8", "replace")

    def _mount_all(self) -> dict[str, Mount]:
        request = {
            "executionId": self._execution_id,
            "applicationId": self._application_id,
            "creatorTenantId": self._creator,
            "body": self._body,
        }
        try:
            status, payload = self._request("POST", "/executions", request)
        except OSError as exc:
            raise MountError(f"mountd at {self._socket_path} is not reachable: {exc}") from exc
        if status != 201:
            raise MountError(
                f"mountd refused execution {self._execution_id!r}: {_mountd_error(status, payload)}"
            )
        mounts = {}
        for param, info in payload["mounts"].items():
            mounts[param] = Mount(
                param_name=param,
                pool_id=UUID(info["poolId"]),
                path=info["path"],
                mode=_checked_mode(info["mode"]),
            )
        return mounts

    def mount(self, param_name: str, ref: DataPoolRef) -> Mount:
        if self._mounts is None:
            self._mounts = self._mount_all()
        mount = self._mounts.get(param_name)
        if mount is None or mount.pool_id != ref.id:
            # The body given to this mounter is not the one being executed: undo it all.
            self._delete()
            raise MountError(
                f"{param_name!r}: data pool {ref.id} is not in the body this MountdMounter "
                f"mounted for execution {self._execution_id!r}"
            )
        self._handed_out.append(mount)
        return mount

    def unmount(self, mount: Mount) -> None:
        try:
            self._handed_out.remove(mount)
        except ValueError:
            raise UnmountError(
                f"{mount.param_name!r} (pool {mount.pool_id}) is not mounted by this mounter"
            ) from None
        if not self._handed_out:
            self._delete()

    def _delete(self) -> None:
        if self._deleted or self._mounts is None:
            return
        self._deleted = True
        try:
            status, payload = self._request("DELETE", f"/executions/{self._execution_id}")
        except OSError as exc:
            raise UnmountError(
                f"mountd at {self._socket_path} is not reachable to unmount execution "
                f"{self._execution_id!r}: {exc}"
            ) from exc
        if status != 200:
            raise UnmountError(
                f"unmounting execution {self._execution_id!r} failed: "
                f"{_mountd_error(status, payload)}"
            )
        if payload.get("failed"):
            errors = "\n".join(f"  - {line}" for line in payload.get("errors", []))
            raise UnmountError(
                f"execution {self._execution_id!r} was unmounted, but not cleanly "
                f"(writes may not be durable):\n{errors}"
            )


__all__ += ["MountdMounter"]
