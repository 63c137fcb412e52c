"""Pick the collective backend of a launch: MLX's TCP `ring`, or `jaccl` (RDMA over Thunderbolt 5), and say why.

MLX's contract for jaccl, checked in MLX 0.32.4's source (`mlx/_distributed_utils/launch.py`, and jaccl's
`Config::from_env`, which reads each variable as JACCL_* first, then MLX_*):
- MLX_RANK: the rank.
- MLX_IBV_DEVICES: the *path* of a JSON file holding an N×N matrix in rank order; entry [i][j] names rank
  i's RDMA device towards rank j ("rdma_en3"), null on the diagonal and, for the ring variant, everywhere
  but the two neighbours.
- MLX_JACCL_COORDINATOR: "ip:port" of rank 0's side channel (a TCP all-gather of connection data): rank 0
  listens there and every other rank connects, so it must be an address of rank 0 all ranks can reach.
- MLX_JACCL_RING: present (mlx.launch sets "1") for `jaccl-ring`: neighbours only, not a full mesh.
MLX reads no variable naming the backend: `mx.distributed.init()` (backend "any") tries the ring first
(it starts when MLX_RANK and MLX_HOSTFILE are set), then MPI, then jaccl. A jaccl rank therefore gets no
MLX_HOSTFILE, so an unmodified script lands on jaccl; see distributed/env.py for what macrun's ranks read.

Pure: the launcher feeds it what preflight reported (launcher/thunderbolt/rdma.py parses the RDMA part).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from distributed.errors import HostError, UsageError
from launcher.room.preflight import HostFacts, InterfaceFacts, active_bridges
from launcher.thunderbolt.rdma import RdmaFacts, best_link, peer_links

BACKENDS = ("auto", "ring", "jaccl", "jaccl-ring")
MIN_MACOS = (26, 2)
ENABLE_RDMA = "run `rdma_ctl enable` in recovery mode on macOS 26.2+"
CABLE_HINT = ("connect every pair of Macs with a Thunderbolt 5 cable for jaccl (ring neighbours only: "
              "--backend jaccl-ring); `macrun hosts check` shows which port faces which Mac; or use --backend auto")
KIND_ORDER = ("ethernet", "wifi", "other", "thunderbolt")  # coordinator: the steadiest shared network first


@dataclass(frozen=True, slots=True)
class BackendHost:
    """One host as the decision sees it."""

    name: str
    os_name: str  # "Darwin" | "Linux"
    os_version: str  # "26.2"
    slots: int = 1  # ranks on this host
    rdma: RdmaFacts = field(default_factory=RdmaFacts)
    interfaces: tuple[InterfaceFacts, ...] = ()
    address: str = ""  # where macrun reaches it (hosts.json "ips" or its SSH address)

    @classmethod
    def from_facts(cls, facts: HostFacts, slots: int, address: str) -> BackendHost:
        return cls(facts.name, facts.os_name, facts.os_version, slots, facts.rdma, facts.interfaces, address)

    @property
    def bridges(self) -> tuple[str, ...]:
        """Active Thunderbolt Bridges, e.g. ("bridge0 (en1, en2)",): one breaks RDMA on its ports."""
        return active_bridges(self.interfaces)


@dataclass(frozen=True, slots=True)
class BackendChoice:
    """The backend, the rank order it needs, MLX_IBV_DEVICES's matrix, and why."""

    name: str  # "ring" | "jaccl" | "jaccl-ring": MACRUN_BACKEND
    reason: str
    order: tuple[str, ...] = ()  # host names in rank order (jaccl); empty for the ring: its plan's order stands
    devices: tuple[tuple[str | None, ...], ...] = ()  # [i][j]: rank i's RDMA device towards rank j

    @property
    def is_jaccl(self) -> bool:
        return self.name != "ring"

    def describe(self) -> str:
        """The launch log's line, e.g. "backend ring: mini2 has no RDMA devices (...)"."""
        return f"backend {self.name}: {self.reason}"

    def devices_json(self) -> str:
        """The MLX_IBV_DEVICES file's content."""
        return json.dumps([list(row) for row in self.devices])


def check_backend(value: str, *, what: str = "--backend") -> str:
    """`value` if it names a backend; UsageError otherwise."""
    if value not in BACKENDS:
        raise UsageError(f"{what} {value!r} is not one of {', '.join(BACKENDS)}")
    return value


def macos_version(text: str) -> tuple[int, ...] | None:
    """"26.2" → (26, 2); None when it is not a version."""
    parts = re.findall(r"\d+", text or "")
    return tuple(int(p) for p in parts[:2]) if parts else None


def _blockers(hosts: Sequence[BackendHost]) -> list[tuple[str, str, str]]:
    """(host, why jaccl cannot run there, what to do), in host order; empty when every host could."""
    if len(hosts) < 2:
        return [(hosts[0].name if hosts else "-", "one host: its ranks talk over loopback",
                 "jaccl runs between two or more Macs, one rank on each")]
    found: list[tuple[str, str, str]] = []
    for h in hosts:
        version = macos_version(h.os_version)
        if h.os_name != "Darwin":
            found.append((h.name, f"{h.name} runs {h.os_name}, and RDMA over Thunderbolt needs macOS 26.2+",
                          "use Macs with Thunderbolt 5 for jaccl, or --backend ring"))
        elif version is not None and version < MIN_MACOS:
            found.append((h.name, f"{h.name} runs macOS {h.os_version}; RDMA over Thunderbolt needs 26.2+",
                          f"update {h.name} to macOS 26.2 or newer, then {ENABLE_RDMA}"))
        elif h.slots > 1:
            found.append((h.name, f"{h.name} runs {h.slots} ranks; jaccl takes one rank per Mac",
                          f"set \"slots\" to 1 for {h.name} in hosts.json, or use --backend ring"))
        elif not h.rdma.devices:
            speed = h.rdma.max_speed_gbps
            why = ("its Thunderbolt ports run at up to 40 Gb/s: Thunderbolt 4 has no RDMA" if speed and speed <= 40
                   else f"Thunderbolt 4 or RDMA not enabled: {ENABLE_RDMA}")
            found.append((h.name, f"{h.name} has no RDMA devices ({why})",
                          f"on a Mac with Thunderbolt 5, {ENABLE_RDMA}; `ibv_devices` then lists rdma_en* devices"))
        elif h.bridges:
            found.append((h.name, f"{h.name}'s Thunderbolt Bridge {', '.join(h.bridges)} is active, which breaks "
                                  "RDMA", f"turn it off on {h.name}: `sudo ifconfig bridge0 down`, or System "
                                          "Settings > Network > Thunderbolt Bridge > Inactive"))
    return found


def _pair_problem(a: str, b: str, links: dict) -> str:  # type: ignore[type-arg]
    """Why a and b cannot talk over RDMA ("" when both cable ends have an active device)."""
    ab, ba = links.get((a, b), []), links.get((b, a), [])
    if not ab and not ba:
        return f"no Thunderbolt cable between {a} and {b}"
    for here, there, ends in ((a, b, ab), (b, a, ba)):
        if not ends:
            return f"{here} does not see {there} on its Thunderbolt ports"
        if best_link(ends) is None:
            return ends[0].problem() + f" (its port facing {there})"
    return ""


def _device(a: str, b: str, links: dict) -> str:  # type: ignore[type-arg]
    link = best_link(links[(a, b)])
    assert link is not None and link.device is not None  # checked by _pair_problem
    return link.device.name


def _ring_order(names: Sequence[str], linked: dict[tuple[str, str], bool]) -> list[str] | None:
    """A cycle through every host along RDMA links, the first host first, the given order tried first."""
    path, n = [names[0]], len(names)

    def extend() -> bool:
        if len(path) == n:
            return linked[(path[-1], path[0])]
        for name in names:
            if name not in path and linked[(path[-1], name)]:
                path.append(name)
                if extend():
                    return True
                path.pop()
        return False

    return path if extend() else None


def _listing(items: Sequence[str], limit: int = 3) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def choose_backend(requested: str, hosts: Sequence[BackendHost]) -> BackendChoice:
    """Decide the backend for `hosts` (in the ring plan's order; rank 0's host first).

    auto: jaccl when every pair of Macs has an RDMA device with an active port at both cable ends (full
    mesh); jaccl-ring when only ring neighbours do (some host order, the first host first); else the ring,
    with the first reason. "jaccl" and "jaccl-ring" raise HostError naming what is missing and the fix
    instead of falling back; "ring" is taken as asked.
    """
    check_backend(requested)
    if requested == "ring":
        return BackendChoice("ring", "asked for (--backend ring)")
    explicit = requested != "auto"
    blockers = _blockers(hosts)
    if blockers:
        if explicit:
            raise HostError(f"--backend {requested} cannot run: " + _listing([b[1] for b in blockers], 4),
                            hint=blockers[0][2])
        others = [b[0] for b in blockers[1:]]
        return BackendChoice("ring", blockers[0][1] + (f" (also: {', '.join(others)})" if others else ""))
    names = [h.name for h in hosts]
    links = peer_links({h.name: h.rdma for h in hosts})
    problem = {(a, b): _pair_problem(a, b, links) for a in names for b in names if a != b}
    missing = [problem[(a, b)] for i, a in enumerate(names) for b in names[i + 1:] if problem[(a, b)]]
    if requested in ("auto", "jaccl") and not missing:
        matrix = tuple(tuple(None if a == b else _device(a, b, links) for b in names) for a in names)
        return BackendChoice("jaccl", f"RDMA over Thunderbolt between every pair of the {len(names)} Macs "
                                      "(full mesh)", tuple(names), matrix)
    if requested == "jaccl":
        raise HostError("--backend jaccl needs RDMA between every pair of Macs: " + _listing(missing),
                        hint=CABLE_HINT)
    order = _ring_order(names, {pair: not why for pair, why in problem.items()})
    if order is None:
        if explicit:  # jaccl-ring: name the gaps of the order as given, the one a person would cable
            hops = [(names[i], names[(i + 1) % len(names)]) for i in range(len(names))]
            gaps = [problem[(a, b) if names.index(a) < names.index(b) else (b, a)] for a, b in hops]
            gaps = [g for g in gaps if g]
            raise HostError("--backend jaccl-ring needs RDMA between ring neighbours, and no order of the hosts "
                            "has it: " + _listing(gaps), hint=CABLE_HINT)
        return BackendChoice("ring", _listing(missing, 1))
    n = len(order)
    matrix = tuple(tuple(_device(a, b, links) if b in (order[i - 1], order[(i + 1) % n]) else None
                         for b in order) for i, a in enumerate(order))
    ring = " → ".join([*order, order[0]])
    why = f"; not a full mesh: {_listing(missing, 1)}" if missing else ""
    return BackendChoice("jaccl-ring", f"RDMA over Thunderbolt between ring neighbours {ring}{why}",
                         tuple(order), matrix)


def pick_coordinator(hosts: Sequence[BackendHost]) -> tuple[str, str]:
    """Rank 0's address every other host can reach (MLX_JACCL_COORDINATOR's ip), and which one it is.

    `hosts` in rank order. A Mac with both Ethernet and Thunderbolt has an address on each; ranks given
    different ones would wait for each other forever. The pick: an address of rank 0 (not loopback, not
    link-local) in a subnet every other host also has an address in, the one macrun reached it by first,
    then Ethernet before Wi-Fi before the rest. Without one, the address macrun reached it by.
    """
    first, others = hosts[0], hosts[1:]
    found = []
    for iface in first.interfaces:
        if not iface.up or iface.kind == "loopback":
            continue
        for cidr in iface.ipv4:
            mine = ipaddress.ip_interface(cidr)
            if mine.ip.is_link_local or mine.ip.is_loopback:
                continue
            if all(any(ipaddress.ip_interface(c).network == mine.network for i in o.interfaces if i.up
                       for c in i.ipv4) for o in others):
                kind = KIND_ORDER.index(iface.kind) if iface.kind in KIND_ORDER else len(KIND_ORDER)
                found.append((str(mine.ip) != first.address, kind, int(mine.ip), str(mine.ip), iface))
    if not found:
        return first.address, f"the address macrun reaches {first.name} at (no network all hosts share was found)"
    *_, ip, iface = min(found, key=lambda c: c[:3])
    return ip, f"{first.name}'s {iface.name} ({iface.kind}), on a network every host shares"


__all__ = ["BACKENDS", "BackendChoice", "BackendHost", "check_backend", "choose_backend",
           "macos_version", "pick_coordinator"]
