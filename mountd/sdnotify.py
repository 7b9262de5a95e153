"""sd_notify(3) with a plain datagram socket: systemd's readiness protocol, no library.

`$NOTIFY_SOCKET` names a Unix datagram socket (a path, or `@name` for the abstract namespace);
each message is newline-separated `KEY=VALUE` lines (`READY=1`, `STOPPING=1`, `STATUS=...`).
Without `$NOTIFY_SOCKET` (not run by systemd as Type=notify) `notify` does nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

__all__ = ["notify"]

log = logging.getLogger(__name__)


def notify(message: str, environ: Mapping[str, str]) -> bool:
    """Send `message` to the service manager; True if it was sent."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor abstract; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("could not notify the service manager at %s: %s", address, exc)
        return False
    return True
