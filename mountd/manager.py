"""The mount manager: executions, their mount workers, and everything that ends them.

An execution is a set of mounts at `<mount_root>/<execution id>/<param>`, one worker process
each (mountd.workers). Rules a newcomer must keep:

- All or nothing: `create` returns only when every mount is live. If one fails, the workers
  already started are stopped (flushing), the directories removed and the id forgotten, so the
  same id can be tried again. An execution is never visible half-mounted except in state
  `mounting`.
- One owner per transition: `_lock` guards every state field; a mount moves from `mounted` to
  `stopping` (teardown) or to `died` (monitor) only under the lock, so a worker that dies while
  being stopped is not also reported as a crash. `Execution.teardown_lock` makes DELETE,
  expiry and shutdown tear an execution down once; a second caller waits and gets the result.
- The monitor thread notices a dead worker within `poll_interval`: the mount is detached
  (lazy unmount), its directory removed (so nothing writes to the local disk underneath by
  mistake), the execution marked failed. The other mounts of that execution stay until it is
  deleted or expires: the service may still be using them.
- Mounts live at most `max_lifetime`; the monitor then tears the execution down (`expired`).
- `shutdown` refuses new executions, waits for ones being mounted, then flushes and unmounts
  everything; every unmount is bounded by `unmount_timeout` (then SIGKILL + lazy unmount).
- Slow work (starting and stopping workers) never runs under `_lock`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from mountd.access import Decision
from mountd.metrics import Metrics, Sample
from mountd.models import EndReason, ExecutionInfo, ExecutionState, MountInfo, MountState
from mountd.workers import (
    StopResult,
    Worker,
    WorkerConfig,
    WorkerStartError,
    describe_exit,
    lazy_unmount,
)

__all__ = [
    "ExecutionBusy",
    "ExecutionExists",
    "ManagerClosed",
    "ManagerConfig",
    "MountFailed",
    "MountManager",
    "MountSpec",
]

log = logging.getLogger(__name__)

_PARALLEL_MOUNTS = 8


class ExecutionExists(Exception):
    """409: an execution with this id is known already."""


class ExecutionBusy(Exception):
    """409: the execution is still being mounted."""


class ManagerClosed(Exception):
    """503: mountd is shutting down."""


class MountFailed(Exception):
    """A mount could not be made; nothing of the execution is left mounted."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True, slots=True)
class ManagerConfig:
    mount_root: str
    log_dir: str
    worker: WorkerConfig
    max_lifetime: float
    unmount_timeout: float
    keep_finished: int
    poll_interval: float = 0.2


@dataclasses.dataclass(frozen=True, slots=True)
class MountSpec:
    """One pool to mount for an execution, as the access decision allowed it."""

    decision: Decision
    pool_url: str


@dataclasses.dataclass(slots=True)
class _Mount:
    param: str
    spec: MountSpec
    path: str
    log_file: str
    state: MountState = MountState.STARTING
    worker: Worker | None = None
    exit_code: int | None = None

    def info(self) -> MountInfo:
        decision = self.spec.decision
        return MountInfo(
            pool_id=decision.pool_id,
            path=self.path,
            mode=decision.mode,
            access=decision.source,
            state=self.state,
            worker_pid=self.worker.pid if self.worker is not None else None,
            exit_code=self.exit_code,
        )


@dataclasses.dataclass(slots=True)
class _Execution:
    id: str
    application_id: uuid.UUID
    creator: str
    created_at: datetime
    expires_at: datetime
    deadline: float
    directory: str
    log_dir: str
    mounts: dict[str, _Mount]
    state: ExecutionState = ExecutionState.MOUNTING
    failed: bool = False
    errors: list[str] = dataclasses.field(default_factory=list)
    finished_at: datetime | None = None
    end_reason: EndReason | None = None
    expiring: bool = False
    teardown_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def info(self) -> ExecutionInfo:
        return ExecutionInfo(
            execution_id=self.id,
            application_id=self.application_id,
            creator_tenant_id=self.creator,
            state=self.state,
            failed=self.failed,
            errors=list(self.errors),
            created_at=self.created_at,
            expires_at=self.expires_at,
            finished_at=self.finished_at,
            end_reason=self.end_reason,
            mounts={param: mount.info() for param, mount in self.mounts.items()},
        )


def _rmdir(path: str) -> None:
    """Remove an (empty) mountpoint or execution directory; already gone is fine."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("leaving %s in place: %s", path, exc)


class MountManager:
    """See the module docstring. Thread-safe; `start` before use, `shutdown` at the end."""

    def __init__(
        self,
        config: ManagerConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._executions: dict[str, _Execution] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._closing = False
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        # I/O counters of workers that are gone (their final values).
        self._retired_io = [0, 0]

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.config.mount_root, mode=0o755, exist_ok=True)
        self._monitor = threading.Thread(target=self._monitor_loop, name="mount-monitor")
        self._monitor.daemon = True
        self._monitor.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self) -> None:
        """Refuse new executions from now on (the rest happens in `shutdown`).

        Called from a signal handler, so it takes no lock (the interrupted code may hold it):
        one assignment is atomic, and `create` reads the flag under the lock before it
        registers an execution, which `shutdown` then waits for.
        """
        self._closing = True

    def shutdown(self) -> None:
        """Flush and unmount every execution, then stop the monitor; see the docstring."""
        self.begin_shutdown()
        deadline = self._clock() + self.config.worker.ready_timeout + 5
        while self._clock() < deadline:
            with self._lock:
                if not any(e.state is ExecutionState.MOUNTING for e in self._executions.values()):
                    break
            time.sleep(0.05)
        with self._lock:
            live = [
                e
                for e in self._executions.values()
                if e.state in (ExecutionState.MOUNTED, ExecutionState.UNMOUNTING)
            ]
        if live:
            log.info("unmounting %d execution(s) before stopping", len(live))
        with concurrent.futures.ThreadPoolExecutor(max_workers=_PARALLEL_MOUNTS) as pool:
            for done in [pool.submit(self._end, e, "shutdown") for e in live]:
                done.result()
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()

    # --- queries -----------------------------------------------------------------------------

    def get(self, execution_id: str) -> ExecutionInfo | None:
        with self._lock:
            execution = self._executions.get(execution_id)
            return execution.info() if execution is not None else None

    def executions(self) -> list[ExecutionInfo]:
        with self._lock:
            executions = sorted(self._executions.values(), key=lambda e: e.created_at)
            return [e.info() for e in executions]

    def counts(self) -> tuple[int, int]:
        """(executions not yet unmounted, live mounts)."""
        with self._lock:
            active = [
                e for e in self._executions.values() if e.state is not ExecutionState.UNMOUNTED
            ]
            mounts = sum(
                1 for e in active for m in e.mounts.values() if m.state is MountState.MOUNTED
            )
            return len(active), mounts

    def samples(self) -> list[Sample]:
        """Gauges and the worker I/O counter for /metrics."""
        states = dict.fromkeys(ExecutionState, 0)
        modes = {"ro": 0, "rw": 0}
        live: list[Worker] = []
        with self._lock:
            # Retired totals and the live set are read together, so that a worker retiring
            # meanwhile is counted once (see _retire).
            io = list(self._retired_io)
            for execution in self._executions.values():
                states[execution.state] += 1
                for mount in execution.mounts.values():
                    if mount.state is MountState.MOUNTED:
                        modes[mount.spec.decision.mode] += 1
                    if mount.worker is not None and mount.state in (
                        MountState.MOUNTED,
                        MountState.STOPPING,
                    ):
                        live.append(mount.worker)
        for worker in live:
            read, written = worker.io()
            io[0] += read
            io[1] += written
        samples: list[Sample] = [("mounts", {"mode": mode}, n) for mode, n in modes.items()]
        samples += [("executions", {"state": state.value}, n) for state, n in states.items()]
        samples += [
            ("worker_io_bytes_total", {"direction": "read"}, io[0]),
            ("worker_io_bytes_total", {"direction": "write"}, io[1]),
        ]
        return samples

    # --- create ------------------------------------------------------------------------------

    def create(
        self,
        execution_id: str,
        application_id: uuid.UUID,
        creator: str,
        specs: dict[str, MountSpec],
    ) -> ExecutionInfo:
        """Mount every spec under `<mount_root>/<execution_id>/<param>`, all or nothing.

        ExecutionExists, ManagerClosed, or MountFailed (after undoing what was mounted).
        """
        now = datetime.now(UTC)
        directory = os.path.join(self.config.mount_root, execution_id)
        log_dir = os.path.join(self.config.log_dir, execution_id)
        execution = _Execution(
            id=execution_id,
            application_id=application_id,
            creator=creator,
            created_at=now,
            expires_at=now + timedelta(seconds=self.config.max_lifetime),
            deadline=self._clock() + self.config.max_lifetime,
            directory=directory,
            log_dir=log_dir,
            mounts={
                param: _Mount(
                    param,
                    spec,
                    os.path.join(directory, param),
                    os.path.join(log_dir, f"{param}.log"),
                )
                for param, spec in specs.items()
            },
        )
        with self._lock:
            if self._closing:
                raise ManagerClosed("mountd is shutting down")
            if execution_id in self._executions:
                raise ExecutionExists(f"execution {execution_id!r} exists already")
            self._executions[execution_id] = execution
        try:
            self._mount_all(execution)
        except BaseException:
            with self._lock:
                del self._executions[execution_id]
            raise
        with self._lock:
            execution.state = ExecutionState.MOUNTED
            for mount in execution.mounts.values():
                if mount.state is MountState.STARTING:
                    mount.state = MountState.MOUNTED
            info = execution.info()
        self.metrics.inc("executions_total")
        log.info(
            "execution %s mounted: %s",
            execution_id,
            ", ".join(
                f"{p}={m.spec.decision.pool_id} {m.spec.decision.mode} ({m.spec.decision.detail})"
                for p, m in execution.mounts.items()
            )
            or "no pools",
        )
        return info

    def _make_dirs(self, execution: _Execution) -> None:
        try:
            os.mkdir(execution.directory, 0o755)
        except FileExistsError:
            if os.listdir(execution.directory):
                raise MountFailed(f"{execution.directory} exists and is not empty", "") from None
        try:
            # mkdir's mode is filtered by the umask; services of other users must traverse.
            os.chmod(execution.directory, 0o755)
            for mount in execution.mounts.values():
                os.mkdir(mount.path, 0o755)
                os.chmod(mount.path, 0o755)
        except OSError as exc:
            for mount in execution.mounts.values():
                _rmdir(mount.path)
            _rmdir(execution.directory)
            raise MountFailed(f"cannot make the mountpoints: {exc}", "") from exc

    def _mount_all(self, execution: _Execution) -> None:
        self._make_dirs(execution)
        mounts = list(execution.mounts.values())
        failures: list[MountFailed] = []
        if mounts:
            with concurrent.futures.ThreadPoolExecutor(
                max_workers=min(len(mounts), _PARALLEL_MOUNTS)
            ) as pool:
                futures = {pool.submit(self._start_worker, m): m for m in mounts}
                for future in concurrent.futures.as_completed(futures):
                    mount = futures[future]
                    try:
                        future.result()
                    except WorkerStartError as exc:
                        self.metrics.inc("errors_total", kind="mount_failed")
                        failures.append(
                            MountFailed(
                                f"{mount.param!r}: mounting data pool "
                                f"{mount.spec.decision.pool_id} failed: {exc}",
                                mount.param,
                            )
                        )
        if not failures:
            return
        for failure in failures:
            log.error("execution %s: %s", execution.id, failure)
        # All or nothing: undo the mounts that worked.
        for mount in mounts:
            if mount.worker is not None:
                result = mount.worker.stop(self.config.unmount_timeout)
                with self._lock:
                    self._retire(mount, MountState.UNMOUNTED, result.exit_code)
                if not result.clean:
                    log.error(
                        "execution %s: undoing %r: %s",
                        execution.id,
                        mount.param,
                        describe_exit(result.exit_code),
                    )
            _rmdir(mount.path)
        _rmdir(execution.directory)
        first = sorted(failures, key=lambda f: f.param)[0]
        if len(failures) > 1:
            first.add_note(f"and {len(failures) - 1} more mount(s) failed")
        raise first

    def _start_worker(self, mount: _Mount) -> None:
        mount.worker = Worker.start(
            self.config.worker,
            mount.spec.pool_url,
            mount.path,
            read_only=mount.spec.decision.mode == "ro",
            log_file=mount.log_file,
        )
        self.metrics.inc("mounts_started_total")

    # --- delete and expiry -------------------------------------------------------------------

    def delete(self, execution_id: str) -> ExecutionInfo | None:
        """Flush and unmount every mount of the execution; None if it is unknown.

        Deleting an execution that is already unmounted returns its record unchanged.
        ExecutionBusy while it is still being mounted.
        """
        with self._lock:
            execution = self._executions.get(execution_id)
            if execution is None:
                return None
            if execution.state is ExecutionState.MOUNTING:
                raise ExecutionBusy(f"execution {execution_id!r} is still being mounted")
        self._end(execution, "deleted")
        with self._lock:
            return execution.info()

    def _end(self, execution: _Execution, reason: EndReason) -> None:
        with execution.teardown_lock:
            with self._lock:
                if execution.state not in (ExecutionState.MOUNTED, ExecutionState.UNMOUNTING):
                    return
                execution.state = ExecutionState.UNMOUNTING
                stopping = []
                for mount in execution.mounts.values():
                    if mount.state is MountState.MOUNTED:
                        mount.state = MountState.STOPPING
                        stopping.append(mount)
            results: dict[str, StopResult] = {}
            if stopping:
                with concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(len(stopping), _PARALLEL_MOUNTS)
                ) as pool:
                    futures = {pool.submit(self._stop_worker, m): m for m in stopping}
                    for future in concurrent.futures.as_completed(futures):
                        results[futures[future].param] = future.result()
            for mount in execution.mounts.values():
                if mount.state is MountState.DIED:
                    # The monitor detaches these; it may still be at it. Both steps are
                    # idempotent, and the execution's directory can only go once they are done.
                    lazy_unmount(mount.path)
                    _rmdir(mount.path)
            _rmdir(execution.directory)
            errors = []
            for param, result in sorted(results.items()):
                mount = execution.mounts[param]
                if result.clean:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(mount.log_file)
                    continue
                self.metrics.inc("errors_total", kind="unmount_failed")
                what = "forced after the unmount timeout" if result.forced else "not clean"
                errors.append(
                    f"{param!r}: unmount {what} ({describe_exit(result.exit_code)}); "
                    f"log: {mount.log_file}"
                )
                errors.extend(
                    f"{param!r}: the upload of {path!r} failed; its bytes are kept in "
                    f"{self.config.worker.options.spill_dir}/lost+found"
                    for path in result.failed_uploads
                )
                errors.extend(f"{param!r}: {line}" for line in result.errors)
            with contextlib.suppress(OSError):
                os.rmdir(execution.log_dir)
            with self._lock:
                if errors:
                    execution.failed = True
                    execution.errors.extend(errors)
                execution.state = ExecutionState.UNMOUNTED
                execution.end_reason = reason
                execution.finished_at = datetime.now(UTC)
                self._finished.append(execution.id)
                while len(self._finished) > self.config.keep_finished:
                    self._executions.pop(self._finished.popleft(), None)
            for _ in results:
                self.metrics.inc("unmounts_total", reason=reason)
            if errors:
                log.error(
                    "execution %s unmounted (%s) with errors: %s", execution.id, reason, errors
                )
            else:
                log.info("execution %s unmounted (%s)", execution.id, reason)

    def _stop_worker(self, mount: _Mount) -> StopResult:
        assert mount.worker is not None
        result = mount.worker.stop(self.config.unmount_timeout)
        with self._lock:
            self._retire(mount, MountState.UNMOUNTED, result.exit_code)
        _rmdir(mount.path)
        return result

    def _retire(self, mount: _Mount, state: MountState, exit_code: int) -> None:
        """A reaped worker's final state; caller holds `_lock`. Its I/O moves to the
        retired totals in the same step in which it leaves the live set."""
        assert mount.worker is not None
        read, written = mount.worker.last_io
        self._retired_io[0] += read
        self._retired_io[1] += written
        mount.state = state
        mount.exit_code = exit_code

    # --- the monitor -------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.config.poll_interval):
            try:
                self._check_workers()
                self._check_lifetimes()
            except Exception:
                # The monitor must outlive any one bad check; the next tick tries again.
                log.exception("mount monitor check failed")

    def _live_mounts(self) -> list[tuple[_Execution, _Mount]]:
        with self._lock:
            return [
                (e, m)
                for e in self._executions.values()
                for m in e.mounts.values()
                if m.state is MountState.MOUNTED and m.worker is not None
            ]

    def _check_workers(self) -> None:
        for execution, mount in self._live_mounts():
            assert mount.worker is not None
            code = mount.worker.poll()
            if code is None:
                continue
            with self._lock:
                if mount.state is not MountState.MOUNTED:
                    continue  # a teardown claimed it first: an expected exit
                self._retire(mount, MountState.DIED, code)
                execution.failed = True
            self.metrics.inc("errors_total", kind="worker_died")
            # Detach before anything else: a dead worker's mount answers ENOTCONN.
            mount.worker.kill()
            _rmdir(mount.path)
            message = (
                f"{mount.param!r}: mount worker {mount.worker.pid} died ({describe_exit(code)}); "
                f"the mount was detached; log: {mount.log_file}"
            )
            with self._lock:
                execution.errors.append(message)
                execution.errors.extend(f"{mount.param!r}: {ln}" for ln in mount.worker.errors())
            log.error("execution %s: %s", execution.id, message)

    def _check_lifetimes(self) -> None:
        now = self._clock()
        with self._lock:
            due = [
                e
                for e in self._executions.values()
                if e.state is ExecutionState.MOUNTED and not e.expiring and now >= e.deadline
            ]
            for execution in due:
                execution.expiring = True
        for execution in due:
            log.info("execution %s reached the maximum mount lifetime", execution.id)
            threading.Thread(
                target=self._end, args=(execution, "expired"), name=f"expire-{execution.id}"
            ).start()
