"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

Counters only go up and live for the process; gauges are computed at scrape time by the
callers of `render` (the mount manager knows what is mounted). Every metric is declared in
`_DECLARED` with its type and help, so a scrape always shows every family, even at zero.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

__all__ = ["Metrics", "Sample"]

PREFIX = "poolfs_mountd_"
Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Mapping[str, str], float]

_DECLARED: dict[str, tuple[str, str]] = {
    "mounts": ("gauge", "Mounts currently live, by mode (ro, rw)."),
    "executions": ("gauge", "Executions known, by state."),
    "worker_io_bytes_total": (
        "counter",
        "Bytes mount workers moved through read/write system calls (FUSE device, store "
        "connections, spill files), from /proc/PID/io, by direction.",
    ),
    "mounts_started_total": ("counter", "Mounts made (workers that reported ready)."),
    "executions_total": ("counter", "Executions accepted and fully mounted."),
    "unmounts_total": ("counter", "Mounts unmounted, by why (deleted, expired, shutdown)."),
    "errors_total": (
        "counter",
        "Errors by kind: mount_failed, worker_died, unmount_failed (upload failures or a "
        "forced unmount), store_unavailable.",
    ),
    "access_denied_total": ("counter", "Mount or grant requests refused (403), by reason."),
    "grants_issued_total": ("counter", "Grants issued, by permission."),
    "requests_rejected_total": ("counter", "Requests refused as malformed (400)."),
    "stale_mounts_cleaned_total": ("counter", "Stale mounts cleaned at start-up."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Metrics:
    """Thread-safe counters plus rendering."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        if name not in _DECLARED or _DECLARED[name][0] != "counter":
            raise KeyError(f"undeclared counter {name!r}")
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self, samples: Iterable[Sample] = ()) -> str:
        """The exposition text: every declared family, counters plus the given samples
        (gauges and computed counters)."""
        by_name: dict[str, list[tuple[Mapping[str, str], float]]] = {n: [] for n in _DECLARED}
        with self._lock:
            for (name, label_items), value in self._counters.items():
                by_name[name].append((dict(label_items), value))
        for name, sample_labels, value in samples:
            if name not in by_name:
                raise KeyError(f"undeclared metric {name!r}")
            by_name[name].append((sample_labels, value))
        lines = []
        for name, (kind, help_text) in _DECLARED.items():
            full = PREFIX + name
            lines.append(f"# HELP {full} {help_text}")
            lines.append(f"# TYPE {full} {kind}")
            rows = sorted(by_name[name], key=lambda row: sorted(row[0].items()))
            if not rows and kind == "counter":
                rows = [({}, 0)] if name not in _LABELLED else []
            for row_labels, value in rows:
                lines.append(f"{full}{_labels(row_labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


# Families that only make sense with labels: no unlabelled zero line for them.
_LABELLED = frozenset(
    {
        "unmounts_total",
        "errors_total",
        "access_denied_total",
        "grants_issued_total",
        "worker_io_bytes_total",
    }
)
