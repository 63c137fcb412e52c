"""Preflight: probe every host once (in parallel), check they can run together, show one table.

Each host runs `distributed/probe.py` from stdin with its configured Python, so the probe also proves
that interpreter exists and reports what it can import. Problems that would make the run fail later
(MLX missing, MLX versions that differ, Python too old, a Mac on battery below `fault.min_battery`)
become errors now, before any rank starts. The table also shows each Mac's RDMA devices and the Mac each
one faces (launcher/thunderbolt/rdma.py), which launcher/thunderbolt/backend.py uses to pick the collective backend.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from distributed.errors import HostError
from distributed.probe import battery_problem
from launcher.room import probecache
from launcher.thunderbolt.rdma import RdmaFacts, describe_ports
from launcher.transport.ssh import SSHConnection, shell_quote

PROBE_SCRIPT = Path(__file__).resolve().parents[2] / "distributed" / "probe.py"
PROBE_TIMEOUT_S = 90.0  # a cold `import mlx.core` on a Mac that just woke up can take a while
MIN_PYTHON = (3, 10)
LOW_DISK_BYTES = 5 * 2**30
LOW_BATTERY_PERCENT = 30  # on battery below this (but above min_battery): the warning says "low"
MIN_BATTERY_PERCENT = 20.0  # fault.min_battery's default: a Mac on battery below it does not start
GIB = 2**30


@dataclass(frozen=True, slots=True)
class InterfaceFacts:
    """One network interface of a host: its kind and IPv4 addresses as `a.b.c.d/len`."""

    name: str
    kind: str  # "loopback" | "thunderbolt" | "wifi" | "ethernet" | "other"
    ipv4: tuple[str, ...]
    members: tuple[str, ...] = ()  # bridge members (macOS Thunderbolt Bridge: en1, en2, ...)
    up: bool = True

    @property
    def addresses(self) -> tuple[str, ...]:
        """The IPv4 addresses without prefix length."""
        return tuple(a.split("/", 1)[0] for a in self.ipv4)


def active_bridges(interfaces: Sequence[InterfaceFacts]) -> tuple[str, ...]:
    """Thunderbolt Bridges that are up with members, e.g. ("bridge0 (en1, en2)",): one breaks RDMA on its ports."""
    return tuple(f"{i.name} ({', '.join(i.members)})" for i in interfaces
                 if i.name.startswith("bridge") and i.up and i.members and i.kind == "thunderbolt")


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What one host's probe reported (see distributed/probe.py)."""

    name: str  # the HostSpec name
    hostname: str  # what the host calls itself
    python_version: str
    python_executable: str
    os_name: str  # "Darwin" | "Linux"
    os_version: str  # macOS product version ("14.5") or the Linux distribution's name
    machine: str  # "arm64", "x86_64"
    chip: str
    memory_bytes: int
    cpu_count: int
    disk_path: str  # the work dir, or its nearest existing parent
    disk_free_bytes: int
    battery_percent: int | None  # None: no battery
    on_ac: bool | None
    mlx_version: str | None  # None: `import mlx.core` failed, see mlx_error
    mlx_error: str | None
    mlx_device: str | None
    interfaces: tuple[InterfaceFacts, ...]
    probe_seconds: float  # wall time of the probe command, seen from here
    openblas: str | None = None  # Linux hosts: an OpenBLAS the launcher preloads for MLX
    battery_state: str | None = None  # "charging", "discharging", "charged", "not charging", ...; None: unknown
    free_ports: tuple[int, ...] = ()  # TCP ports free on the host when probed, where the probe was asked for some
    rdma: RdmaFacts = field(default_factory=RdmaFacts)  # macOS 26.2+: RDMA devices, Thunderbolt ports; else empty

    @property
    def python_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.python_version.split(".")[:2] if p.isdigit())

    @property
    def os_label(self) -> str:
        """Short: "macOS 15.1", "Debian 12" (the distribution's long name cut at its version)."""
        if self.os_name == "Darwin":
            return f"macOS {self.os_version}"
        label = (self.os_version or self.os_name).replace(" GNU/Linux", "")
        return label.split(" (")[0]

    @property
    def thunderbolt(self) -> tuple[InterfaceFacts, ...]:
        return tuple(i for i in self.interfaces if i.kind == "thunderbolt")

    @classmethod
    def from_probe(cls, name: str, data: Mapping[str, Any], seconds: float) -> HostFacts:
        """Build from the probe's JSON object (KeyError/TypeError/ValueError if it is malformed)."""
        battery = data.get("battery") or {}
        mlx = data.get("mlx") or {}
        return cls(
            name=name, hostname=str(data["hostname"]), python_version=str(data["python_version"]),
            python_executable=str(data["python_executable"]), os_name=str(data["os_name"]),
            os_version=str(data["os_version"]), machine=str(data["machine"]), chip=str(data["chip"]),
            memory_bytes=int(data["memory_bytes"]), cpu_count=int(data["cpu_count"]),
            disk_path=str(data["disk_path"]), disk_free_bytes=int(data["disk_free_bytes"]),
            battery_percent=int(battery["percent"]) if battery else None,
            on_ac=bool(battery["on_ac"]) if battery else None,
            mlx_version=mlx.get("version"), mlx_error=mlx.get("error"), mlx_device=mlx.get("device"),
            interfaces=tuple(
                InterfaceFacts(str(i["name"]), str(i["kind"]), tuple(i.get("ipv4", ())),
                               tuple(i.get("members", ())), bool(i.get("up", True)))
                for i in data.get("interfaces", ())),
            probe_seconds=seconds, openblas=data.get("openblas") or None,
            free_ports=tuple(int(p) for p in data.get("free_ports") or ()),
            battery_state=battery.get("state") if battery else None,
            rdma=RdmaFacts.from_probe(data.get("rdma") if isinstance(data.get("rdma"), Mapping) else None),
        )


@dataclass(frozen=True, slots=True)
class Problem:
    """One preflight finding; errors stop the launch, warnings are shown."""

    host: str  # a host name, or "*" for a finding about several hosts
    severity: str  # "error" | "warning"
    message: str
    hint: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


def probe_host(conn: SSHConnection, workdir: str | None = None, ports: int = 0) -> HostFacts:
    """Run the probe on one host: one remote command, the script fed on stdin; `ports` free ports asked too."""
    host = conn.host
    python, workdir = host.python, workdir or host.workdir
    script = PROBE_SCRIPT.read_bytes()
    key = probecache.cache_key(conn.target.label, python, script)
    known, cached = probecache.lookup(key)
    cmd = f"{shell_quote(python)} - {shell_quote(workdir)} {shell_quote(known or '-')} {int(ports)}"
    started = time.perf_counter()
    result = conn.run(cmd, stdin=script, timeout=PROBE_TIMEOUT_S)
    seconds = time.perf_counter() - started
    where = f"{host.name} ({conn.target.label})"
    if result.rc == 127:
        raise HostError(f"{where}: Python interpreter {python!r} not found",
                        hint=f"set \"python\" for {host.name} in hosts.json to a Python 3.10+ that has MLX "
                             "(e.g. /opt/homebrew/bin/python3 or a virtualenv's bin/python)")
    try:
        data = json.loads(result.stdout)
        mlx, fingerprint = data.get("mlx") or {}, data.get("mlx_fingerprint")
        if mlx.get("cached") and cached is not None:
            data["mlx"] = cached  # the install is as it was: the answer of the last import stands
        elif isinstance(fingerprint, str) and mlx.get("version") and not mlx.get("error"):
            probecache.store({key: (fingerprint, {k: mlx.get(k) for k in ("version", "device", "error")})})
        return HostFacts.from_probe(host.name, data, seconds)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise HostError(f"{where}: the probe with {python!r} failed (exit status {result.rc}): {tail}",
                        hint=f"check that {python!r} is Python 3.9 or newer; set \"python\" for "
                             f"{host.name} in hosts.json") from exc


def probe_hosts(conns: Sequence[SSHConnection], workdir_by_host: Mapping[str, str] | None = None,
                ports_by_host: Mapping[str, int] | None = None) -> dict[str, HostFacts]:
    """Probe all hosts in parallel, keyed by host name; one HostError lists every host that failed."""
    workdirs, ports = workdir_by_host or {}, ports_by_host or {}
    if not conns:
        return {}
    with ThreadPoolExecutor(max_workers=min(32, len(conns))) as pool:
        futures = {c.host.name: pool.submit(probe_host, c, workdirs.get(c.host.name), ports.get(c.host.name, 0))
                   for c in conns}
    facts: dict[str, HostFacts] = {}
    failures: list[HostError] = []
    for name, fut in futures.items():
        try:
            facts[name] = fut.result()
        except HostError as exc:
            failures.append(exc)
    if failures:
        lines = [str(e) for e in failures]
        raise HostError(lines[0] if len(lines) == 1 else
                        f"the probe failed on {len(lines)} hosts:\n  " + "\n  ".join(lines),
                        hint=failures[0].hint) from failures[0]
    return facts


def _install_hint(f: HostFacts, version: str | None) -> str:
    package = "mlx" if f.os_name == "Darwin" else "mlx[cpu]"
    pinned = f"{package}=={version}" if version else package
    return (f"on {f.name}: `{f.python_executable} -m pip install {shell_quote(pinned)}`, "
            f"or set \"python\" for {f.name} in hosts.json to an interpreter that has it")


def check_hosts(facts: Mapping[str, HostFacts], *, local_mlx: str | None = None,
                min_battery: float = MIN_BATTERY_PERCENT) -> list[Problem]:
    """Find what would break the run: errors first, then warnings (low disk, on battery above `min_battery`).

    Errors: MLX missing, Python too old, a Mac on battery below `min_battery`, MLX versions that differ.
    `local_mlx` (this machine's MLX version, if any) is the version suggested when hosts disagree and it
    is one of theirs; otherwise the most common version among the hosts is suggested. `min_battery`
    (fault.min_battery, percent; 0 allows any) refuses a Mac on battery below it: it would die mid-run.
    """
    errors: list[Problem] = []
    warnings: list[Problem] = []
    versions = {n: f.mlx_version for n, f in facts.items() if f.mlx_version}
    counts = Counter(versions.values())
    target = local_mlx if local_mlx in counts else (counts.most_common(1)[0][0] if counts else local_mlx)
    for name, f in facts.items():
        if f.mlx_version is None:
            errors.append(Problem(name, "error",
                                  f"MLX does not import on {name} with {f.python_executable}: {f.mlx_error}",
                                  _install_hint(f, target)))
    for name, f in facts.items():
        if f.python_tuple < MIN_PYTHON:
            errors.append(Problem(name, "error",
                                  f"{name} runs Python {f.python_version} ({f.python_executable}); "
                                  f"macrun needs {'.'.join(map(str, MIN_PYTHON))} or newer",
                                  f"install a newer Python there (e.g. `brew install python@3.12`) and set "
                                  f"\"python\" for {name} in hosts.json"))
    refused: set[str] = set()  # on battery below min_battery: an error, so no warning as well
    for name, f in facts.items():
        reason = battery_problem({"percent": f.battery_percent, "on_ac": f.on_ac}, min_battery)
        if reason:
            refused.add(name)
            errors.append(Problem(name, "error", f"{name} is {reason}",
                                  f"plug {name} in, or allow it with --set fault.min_battery=0"))
    if len(counts) > 1:
        listing = ", ".join(f"{n} {v}" for n, v in sorted(versions.items()))
        errors.append(Problem("*", "error", f"MLX versions differ between hosts: {listing}",
                              f"install the same version everywhere: `pip install mlx=={target}` "
                              f"(Linux: `pip install 'mlx[cpu]=={target}'`)"))
    for name, f in facts.items():
        if 0 <= f.disk_free_bytes < LOW_DISK_BYTES:
            warnings.append(Problem(name, "warning",
                                    f"{name} has only {f.disk_free_bytes / GIB:.1f} GiB free at "
                                    f"{f.disk_path}",
                                    "free some space there: checkpoints and data are written below it"))
        if f.on_ac is False and name not in refused:
            low = f.battery_percent is not None and f.battery_percent < LOW_BATTERY_PERCENT
            warnings.append(Problem(name, "warning",
                                    f"{name} is on battery ({f.battery_percent}%)" + (", low" if low else ""),
                                    "plug it in: a long run drains the battery and macOS may throttle it"))
        bridges = active_bridges(f.interfaces)
        if f.rdma.devices and bridges:
            warnings.append(Problem(name, "warning", f"{name}'s Thunderbolt Bridge {', '.join(bridges)} is active: "
                                    "RDMA (the jaccl backend) does not work while it is",
                                    f"turn it off on {name}: `sudo ifconfig bridge0 down`, or System Settings > "
                                    "Network > Thunderbolt Bridge > Inactive"))
    return errors + warnings


def raise_for_problems(problems: Sequence[Problem]) -> None:
    """Raise one HostError for the errors among `problems` (the first one leads); warnings pass."""
    errors = [p for p in problems if p.is_error]
    if not errors:
        return
    first = errors[0]
    message = first.message
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more: " + "; ".join(p.message for p in errors[1:]) + ")"
    raise HostError(message, hint=first.hint)


def _short_chip(chip: str) -> str:
    """"Apple M2 Ultra" stays; "AMD EPYC 7B13 64-Core Processor" becomes "AMD EPYC 7B13"."""
    words = chip.replace("(R)", "").replace("(TM)", "").split()
    keep = [w for w in words if not w.endswith("-Core") and w not in ("Processor", "CPU", "@")]
    return " ".join(keep[:4])


def render_preflight(facts: Mapping[str, HostFacts], problems: Sequence[Problem] = ()) -> Table:
    """One row per host: what it is, what it runs, its links and its status."""
    table = Table(title="preflight", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("host", "OS", "chip", "memory", "Python", "MLX", "Thunderbolt", "RDMA", "free disk", "battery",
                "status"):
        table.add_column(col, justify="right" if col in ("memory", "free disk") else "left",
                         no_wrap=col in ("host", "Thunderbolt", "RDMA", "MLX", "Python"))
    rdma = {name: f.rdma for name, f in facts.items()}
    for name, f in facts.items():
        mine = [p for p in problems if p.host in (name, "*")]
        if any(p.is_error for p in mine):
            status = "[red]error[/red]"
        elif mine:
            status = "[yellow]warning[/yellow]"
        else:
            status = "[green]ok[/green]"
        tb = "\n".join(f"{i.name} {' '.join(i.addresses) or '(no IPv4)'}" for i in f.thunderbolt) or "-"
        devices = "\n".join(describe_ports(name, rdma)) or "-"
        power = "AC" if f.on_ac else "battery"
        battery = "-" if f.battery_percent is None else f"{f.battery_percent}% {power}"
        table.add_row(
            escape(name), escape(f.os_label), escape(_short_chip(f.chip or f.machine)),
            f"{f.memory_bytes / GIB:.0f} GiB",
            f.python_version,
            escape(f.mlx_version) if f.mlx_version else "[red]missing[/red]", escape(tb), escape(devices),
            f"{f.disk_free_bytes / GIB:.0f} GiB" if f.disk_free_bytes >= 0 else "?", battery, status)
    return table


def run_preflight(conns: Sequence[SSHConnection], *, workdir_by_host: Mapping[str, str] | None = None,
                  ports_by_host: Mapping[str, int] | None = None, local_mlx: str | None = None,
                  min_battery: float = MIN_BATTERY_PERCENT) -> tuple[dict[str, HostFacts], list[Problem]]:
    """Probe, check and raise for errors in one call; return the facts and the remaining warnings."""
    facts = probe_hosts(conns, workdir_by_host, ports_by_host)
    problems = check_hosts(facts, local_mlx=local_mlx, min_battery=min_battery)
    raise_for_problems(problems)
    return facts, problems
