"""Which hosts can take part right now: connect to each on its own, probe it, and keep those that pass.

A launch refuses to start when any host fails (nothing half-started); a restart after a fault instead
goes on with the hosts that answer. `survey` gives both lists, with one reason per host left out, and
`RejoinWatcher` asks the dropped hosts again in the background while a run goes on without them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from distributed.errors import MacrunError
from launcher.room.hosts import HostSpec
from launcher.room.preflight import check_hosts, probe_hosts
from launcher.transport.ssh import SSHConnection, connect

SURVEY_CONNECT_TIMEOUT_S = 5.0  # a host on the LAN answers in milliseconds; asleep or cut off, never
REJOIN_INTERVAL_S = 5.0


@dataclass
class Survey:
    """The outcome: hosts that can run ranks now (in the given order) and why each other one cannot."""

    usable: list[HostSpec] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)


def _connect(host: HostSpec, timeout: float, accept_new_host_key: bool) -> SSHConnection | str:
    try:
        return connect(host, timeout=timeout, accept_new_host_key=accept_new_host_key)
    except MacrunError as exc:
        return exc.message
    except Exception as exc:  # paramiko and sockets raise many kinds; any of them means "not now"
        return f"cannot connect to {host.name}: {exc}"


def survey(hosts: Sequence[HostSpec], *, accept_new_host_keys: bool = False, min_battery: float = 20.0,
           timeout: float = SURVEY_CONNECT_TIMEOUT_S) -> Survey:
    """Connect to and probe every host in parallel; a host that cannot connect or fails preflight is dropped."""
    result = Survey()
    if not hosts:
        return result
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        outcomes = list(pool.map(lambda h: _connect(h, timeout, accept_new_host_keys), hosts))
    conns = [o for o in outcomes if isinstance(o, SSHConnection)]
    try:
        facts: dict = {}
        for conn in conns:  # one probe per host, so one host's failure names only that host
            try:
                facts.update(probe_hosts([conn], {conn.host.name: conn.host.workdir}))
            except MacrunError as exc:
                result.dropped[conn.host.name] = exc.message
        problems = check_hosts(facts, min_battery=min_battery)
        for p in problems:
            if p.severity == "error" and p.host in facts:
                result.dropped.setdefault(p.host, p.message)
    finally:
        for conn in conns:
            conn.close()
    for host, outcome in zip(hosts, outcomes, strict=True):
        if isinstance(outcome, str):
            result.dropped[host.name] = outcome
        elif host.name not in result.dropped:
            result.usable.append(host)
    return result


class RejoinWatcher:
    """Surveys dropped hosts every few seconds in a thread; `ready()` names those that answer again."""

    def __init__(self, hosts: Sequence[HostSpec], *, accept_new_host_keys: bool, min_battery: float,
                 interval: float = REJOIN_INTERVAL_S) -> None:
        self.hosts, self.interval = list(hosts), interval
        self.accept, self.min_battery = accept_new_host_keys, min_battery
        self._ready: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rejoin-watch", daemon=True)
        if self.hosts:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            found = survey(self.hosts, accept_new_host_keys=self.accept, min_battery=self.min_battery)
            if found.usable:
                self._ready = [h.name for h in found.usable]
                return

    def ready(self) -> list[str]:
        return list(self._ready)

    def close(self) -> None:
        self._stop.set()
