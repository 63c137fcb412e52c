"""What keeps hostile peers of the rendezvous server cheap: caps on unauthenticated connections and a log
rate limit per peer address.

The store listens on the LAN before any rank has connected, so anyone there can open connections to it.
Authentication (distributed.store) stops them reading or writing data; these two stop them costing the
launcher threads, file descriptors or a flooded log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


class Admission:
    """Counts connections that have not authenticated yet, in all and per peer address, against caps."""

    def __init__(self, total: int, per_peer: int) -> None:
        if total < 1 or per_peer < 1:
            raise ValueError(f"caps on unauthenticated connections must be >= 1, not {total} and {per_peer}")
        self.total, self.per_peer = total, per_peer
        self._lock = threading.Lock()
        self._pending: dict[str, int] = {}  # peer address -> its connections still in the handshake
        self._count = 0

    def admit(self, host: str) -> str | None:
        """Count a new connection from `host`; None if it may go on, else why it is refused (not counted)."""
        with self._lock:
            if self._count >= self.total:
                return f"{self._count} unauthenticated connections already, the most allowed"
            mine = self._pending.get(host, 0)
            if mine >= self.per_peer:
                return f"{mine} unauthenticated connections from {host} already, the most allowed per address"
            self._pending[host] = mine + 1
            self._count += 1
            return None

    def settle(self, host: str) -> None:
        """A connection admitted from `host` has authenticated, failed or gone."""
        with self._lock:
            mine = self._pending.get(host, 0) - 1
            if mine > 0:
                self._pending[host] = mine
            else:
                self._pending.pop(host, None)
            self._count = max(0, self._count - 1)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._count


@dataclass
class _Window:
    start: float
    sent: int = 0
    suppressed: int = 0  # lines dropped in this window, or carried from the last one until a line goes out


class LogLimiter:
    """Passes at most `burst` lines per key (a peer's address) in each `interval` s window; the lines beyond
    are counted, and the count rides on that key's next line: "... (and 37 more from 10.0.0.5)"."""

    def __init__(self, log: Callable[[str], None], burst: int = 5, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self.burst, self.interval, self._clock = log, burst, interval, clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def __call__(self, key: str, line: str, more: str | None = None) -> bool:
        """Log `line` unless `key` used up its burst; `more` names the dropped lines ("from <key>" if None).
        Returns whether the line went out."""
        with self._lock:
            now = self._clock()
            window = self._windows.get(key)
            if window is None or now - window.start >= self.interval:
                window = self._windows[key] = _Window(now, suppressed=window.suppressed if window else 0)
                if len(self._windows) > 1024:  # many addresses: forget the quiet ones, so memory stays bounded
                    self._windows = {k: w for k, w in self._windows.items() if now - w.start < self.interval}
            if window.sent >= self.burst:
                window.suppressed += 1
                return False
            window.sent += 1
            if window.suppressed:
                line += f" (and {window.suppressed} more {more or f'from {key}'})"
                window.suppressed = 0
        self._log(line)
        return True
