"""Check machines one by one for the wizard: connect and probe each in parallel, one verdict per machine.

`launcher.room.preflight.run_preflight` stops a launch at the first problem; the wizard instead wants every
machine's state at once, so it can show the unreachable ones with their reason, leave them out and go on
with the rest. The probing itself is preflight's (`probe_host`, `check_hosts`), so the verdicts agree with
what the launch will check again.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from rich.markup import escape
from rich.table import Table

from distributed.errors import HostError
from launcher.room.hosts import HostSpec
from launcher.room.preflight import GIB, HostFacts, Problem, check_hosts, probe_host
from launcher.transport.ssh import connect

CONNECT_TIMEOUT_S = 8.0
# launcher.transport.ssh words an unknown host key as "the host key of NAME (ADDR) is not known: ED25519 SHA256:...".
_UNKNOWN_KEY = re.compile(r"host key of .* is not known: (\S+ SHA256:\S+)")


class CheckState(Enum):
    """What the check found out about one machine."""

    OK = "ok"
    UNREACHABLE = "unreachable"  # no connection, no login, or the probe failed
    UNKNOWN_KEY = "unknown key"  # reachable, but its SSH host key is not in known_hosts yet
    NOT_READY = "not ready"  # reachable, but its Python cannot run macrun (MLX missing, too old)


@dataclass(frozen=True, slots=True)
class HostCheck:
    """One machine's verdict."""

    name: str
    state: CheckState
    facts: HostFacts | None = None
    reason: str = ""  # one line: why it is not usable
    hint: str | None = None
    fingerprint: str | None = None  # "ED25519 SHA256:..." when the key is unknown
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def usable(self) -> bool:
        return self.state is CheckState.OK


def unknown_key_fingerprint(exc: HostError) -> str | None:
    """The offered key ("ED25519 SHA256:...") when `exc` says the host key is unknown, else None."""
    explicit = getattr(exc, "fingerprint", None)
    if isinstance(explicit, str):
        return explicit
    match = _UNKNOWN_KEY.search(exc.message)
    return match.group(1) if match else None


def _connect_and_probe(spec: HostSpec, timeout: float) -> HostFacts | HostCheck:
    try:
        conn = connect(spec, timeout=timeout)
    except HostError as exc:
        fingerprint = unknown_key_fingerprint(exc)
        if fingerprint:
            return HostCheck(spec.name, CheckState.UNKNOWN_KEY, reason=f"host key not known yet: {fingerprint}",
                             hint=exc.hint, fingerprint=fingerprint)
        return HostCheck(spec.name, CheckState.UNREACHABLE, reason=exc.message, hint=exc.hint)
    try:
        return probe_host(conn)
    except HostError as exc:  # logged in, but the probe could not run with that interpreter
        return HostCheck(spec.name, CheckState.NOT_READY, reason=exc.message, hint=exc.hint)
    finally:
        conn.close()


def judge(facts: Mapping[str, HostFacts]) -> tuple[dict[str, HostCheck], list[Problem]]:
    """Turn probe results into verdicts with preflight's rules; also return problems about several hosts.

    A host with an error of its own (MLX missing, Python too old) is NOT_READY; its warnings (battery,
    disk) travel with an OK verdict. Errors about the set of hosts (MLX versions differ) come back apart.
    """
    problems = check_hosts(facts)
    checks: dict[str, HostCheck] = {}
    for name, f in facts.items():
        mine = [p for p in problems if p.host == name]
        errors = [p for p in mine if p.is_error]
        warnings = tuple(p.message for p in mine if not p.is_error)
        if errors:
            checks[name] = HostCheck(name, CheckState.NOT_READY, facts=f, reason=errors[0].message,
                                     hint=errors[0].hint, warnings=warnings)
        else:
            checks[name] = HostCheck(name, CheckState.OK, facts=f, warnings=warnings)
    return checks, [p for p in problems if p.host == "*"]


def check_machines(specs: Sequence[HostSpec], *,
                   timeout: float = CONNECT_TIMEOUT_S) -> tuple[dict[str, HostCheck], list[Problem]]:
    """Connect to and probe every host in parallel; a verdict per host (in `specs` order), group problems.

    Never raises for a host's own trouble: that is its verdict. Connections are closed afterwards.
    """
    if not specs:
        return {}, []
    with ThreadPoolExecutor(max_workers=min(16, len(specs))) as pool:
        outcomes = list(pool.map(lambda s: _connect_and_probe(s, timeout), specs))
    facts = {s.name: o for s, o in zip(specs, outcomes, strict=True) if isinstance(o, HostFacts)}
    judged, group = judge(facts)
    checks = {s.name: judged[s.name] if isinstance(o, HostFacts) else o
              for s, o in zip(specs, outcomes, strict=True)}
    return checks, group


def _thunderbolt(f: HostFacts) -> str:
    up = [i for i in f.thunderbolt if i.up]
    if not up:
        return "-"
    return ", ".join(i.name for i in up) + ("" if any(i.ipv4 for i in up) else " (no IPv4)")


def render_checks(checks: Mapping[str, HostCheck]) -> Table:
    """One row per machine: what it is and runs, or why it cannot take part (the reasons follow the table)."""
    table = Table(title="machines", title_justify="left")
    for col in ("host", "chip", "memory", "Python", "MLX", "Thunderbolt", "battery", "status"):
        table.add_column(col, justify="right" if col == "memory" else "left")
    colours = {CheckState.OK: "green", CheckState.UNKNOWN_KEY: "yellow"}
    for name, c in checks.items():
        label = escape(name)
        status = c.state.value if not (c.usable and c.warnings) else "ok, warning"
        status = f"[{colours.get(c.state, 'red')}]{status}[/]"
        f = c.facts
        if f is None:
            table.add_row(label, "", "", "", "", "", "", status)
            continue
        battery = "-" if f.battery_percent is None else f"{f.battery_percent}% {'AC' if f.on_ac else 'battery'}"
        table.add_row(label, escape(f.chip or f.machine), f"{f.memory_bytes / GIB:.0f} GiB",
                      escape(f.python_version),
                      escape(f.mlx_version) if f.mlx_version else "[red]missing[/]",
                      escape(_thunderbolt(f)), battery, status)
    return table
