"""The systemd notify protocol, spoken directly: newline-separated KEY=VALUE datagrams to $NOTIFY_SOCKET.

Under `Type=notify` systemd counts the service as started only once it sends READY=1; with
`WatchdogSec=` it sets WATCHDOG_USEC and kills (and with `Restart=on-failure` restarts) a service
that sends no WATCHDOG=1 for that long. STATUS= is the line `systemctl status` shows, STOPPING=1 says
the service is shutting down. Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

import os
import socket
import time
from collections.abc import Mapping

from icldaemon.logs import get_logger

WATCHDOG_SHARE = 0.5  # of WATCHDOG_USEC between two WATCHDOG=1, as sd_watchdog_enabled(3) advises


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 messages, or None when systemd expects none from this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 1e6 * WATCHDOG_SHARE


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ):
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        self.address = address
        self.watchdog_interval = watchdog_interval(environ) if address else None
        # systemd's timeout itself (WATCHDOG_USEC), in seconds: None when there is no watchdog
        self.watchdog_timeout = self.watchdog_interval / WATCHDOG_SHARE if self.watchdog_interval else None
        self._socket: socket.socket | None = None
        self._last_watchdog: float | None = None
        self._last_status: str | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send one message (READY=1, STATUS=..., ...); False when not under systemd or when sending failed."""
        if self.address is None:
            return False
        message = "\n".join(f"{name}={value}" for name, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, self.address)
        except OSError as exc:
            if not self._failed:  # once: a vanished socket would otherwise log at every watchdog tick
                get_logger().warning("sd_notify_failed", address=self.address, error=str(exc))
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        self._last_status = status
        return self.notify(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        """Send STATUS= when it changed since the last one."""
        if status == self._last_status:
            return False
        self._last_status = status
        return self.notify(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        self._last_status = status
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self, now: float | None = None) -> bool:
        """Send WATCHDOG=1 when the watchdog is on and half its timeout has passed since the last one."""
        if self.watchdog_interval is None:
            return False
        now = time.monotonic() if now is None else now
        if self._last_watchdog is not None and now - self._last_watchdog < self.watchdog_interval:
            return False
        self._last_watchdog = now
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
