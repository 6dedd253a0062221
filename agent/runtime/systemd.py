"""systemd's notify protocol (sd_notify): READY, WATCHDOG, STATUS, STOPPING, RELOADING.

A dozen lines of a documented datagram protocol, so no extra dependency: the message goes to
the unix datagram socket named by ``$NOTIFY_SOCKET`` (``@name`` = the abstract namespace).
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. Runtime-neutral: both the asyncio
and the gevent process call it from their running loop, so a stuck loop stops the watchdog.
"""

from __future__ import annotations

import logging
import os
import socket

_LOGGER = logging.getLogger(__name__)


def notify(*states: str) -> bool:
    """Send ``KEY=value`` lines to systemd; False when not under systemd or the send fails."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(states).encode("utf-8"), address)
        return True
    except OSError as exc:
        _LOGGER.debug("sd_notify to %s failed: %s", address, exc)
        return False


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1 (half of ``$WATCHDOG_USEC``), or None when not asked to."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None  # the watchdog is meant for another process (e.g. a wrapper)
    return int(usec) / 2_000_000.0
