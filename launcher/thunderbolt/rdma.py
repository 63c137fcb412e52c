"""RDMA over Thunderbolt as the probe saw it: parse the raw command output, then match cables across hosts.

The probe (distributed/probe.py) runs `ibv_devices`, `ibv_devinfo` and `system_profiler
SPThunderboltDataType -json` on each Mac and hands back their output with networksetup's port names;
everything here is a pure function of that text, so every Mac case is a unit test on recorded output.

How the pieces fit (the same mapping as MLX's `mlx.distributed_config`, MLX 0.32):
- system_profiler lists one bus per Thunderbolt receptacle, with the bus's own `domain_uuid_key` and, in
  `_items`, the device plugged into it; another Mac shows up there with *its* bus's `domain_uuid_key`.
  So host A's port faces host B when the UID A's port sees is one of B's own port UIDs.
- networksetup names receptacle N's network port "Thunderbolt N" and gives its device, e.g. en3.
- macOS names the RDMA device of that port `rdma_` + the device: rdma_en3.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACTIVE = "PORT_ACTIVE"


@dataclass(frozen=True, slots=True)
class RdmaDevice:
    """One verbs device (`ibv_devices`) and the states of its ports (`ibv_devinfo`)."""

    name: str  # "rdma_en3"
    states: tuple[str, ...] = ()  # per port: "PORT_ACTIVE", "PORT_DOWN", ...; empty: ibv_devinfo said nothing

    @property
    def active(self) -> bool:
        return ACTIVE in self.states

    @property
    def state(self) -> str:
        """One word for a table or a reason: "active", "PORT_DOWN", or "state unknown"."""
        if self.active:
            return "active"
        return self.states[0] if self.states else "state unknown"


@dataclass(frozen=True, slots=True)
class ThunderboltPort:
    """One Thunderbolt receptacle of a Mac and what is plugged into it."""

    receptacle: str  # "1", "2", ... (system_profiler's receptacle_id_key)
    uid: str  # this bus's domain UUID: what the Mac at the other end of the cable sees
    iface: str | None = None  # its network device (networksetup "Thunderbolt N"), e.g. "en3"
    peer_uid: str | None = None  # the domain UUID of the Mac plugged in here; None: nothing, or not a Mac
    peer_name: str | None = None  # what that Mac calls itself in system_profiler ("Mac Studio")
    speed: str | None = None  # "Up to 80 Gb/s": Thunderbolt 5 reports 80 or 120, Thunderbolt 4 40


@dataclass(frozen=True, slots=True)
class RdmaFacts:
    """One host's RDMA devices and Thunderbolt ports; empty off macOS and on Macs without RDMA."""

    devices: tuple[RdmaDevice, ...] = ()
    ports: tuple[ThunderboltPort, ...] = ()
    notes: tuple[str, ...] = ()  # why something is missing: a command absent, timed out, unparsable

    def device_for(self, iface: str | None) -> RdmaDevice | None:
        """The RDMA device of a network device: rdma_<iface> (or a device named after it some other way)."""
        if not iface:
            return None
        for dev in self.devices:
            if dev.name == f"rdma_{iface}":
                return dev
        return next((d for d in self.devices if d.name == iface or d.name.endswith(f"_{iface}")), None)

    @property
    def max_speed_gbps(self) -> int | None:
        """The fastest Thunderbolt port's rate in Gb/s, or None when system_profiler gave none."""
        rates = [int(m.group(1)) for p in self.ports if p.speed
                 for m in [re.search(r"(\d+)\s*Gb/s", p.speed)] if m]
        return max(rates) if rates else None

    @classmethod
    def from_probe(cls, raw: Mapping[str, Any] | None) -> RdmaFacts:
        """Parse the probe's "rdma" object ({} on Linux); odd output becomes notes, never an exception."""
        if not raw:
            return cls()
        notes = [str(n) for n in raw.get("notes") or ()]
        names = parse_ibv_devices(str(raw.get("ibv_devices") or ""))
        states = parse_ibv_devinfo(str(raw.get("ibv_devinfo") or ""))
        for name in states:  # ibv_devices failed but ibv_devinfo named the device: it exists
            if name not in names:
                names.append(name)
        devices = tuple(RdmaDevice(n, states.get(n, ())) for n in names)
        if devices and not states:
            notes.append("ibv_devinfo gave no port states")
        hardware = raw.get("hardware_ports") or {}
        ports, more = parse_thunderbolt(str(raw.get("thunderbolt") or ""),
                                        hardware if isinstance(hardware, Mapping) else {})
        return cls(devices, tuple(ports), tuple(notes + more))


def parse_ibv_devices(text: str) -> list[str]:
    """Device names from `ibv_devices` (a "device / node GUID" table), in its order."""
    names: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] in ("device", "------") or set(words[0]) <= {"-"}:
            continue
        if len(words) >= 2 and re.fullmatch(r"[0-9a-fA-F:]+", words[1]) and words[0] not in names:
            names.append(words[0])
    return names


def parse_ibv_devinfo(text: str) -> dict[str, tuple[str, ...]]:
    """{device: port states} from `ibv_devinfo` ("hca_id: rdma_en3" blocks with "state: PORT_ACTIVE (4)")."""
    found: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        head = re.match(r"^hca_id:\s*(\S+)", line)
        if head:
            current = head.group(1)
            found.setdefault(current, [])
            continue
        state = re.match(r"^\s+state:\s*(\S+)", line)
        if state and current is not None:
            found[current].append(state.group(1))
    return {name: tuple(states) for name, states in found.items()}


def parse_thunderbolt(text: str, hardware_ports: Mapping[str, str]) -> tuple[list[ThunderboltPort], list[str]]:
    """Ports from `system_profiler SPThunderboltDataType -json` and networksetup's {device: port name}.

    Returns the ports and notes about what could not be read (bad JSON, a port without a network device).
    """
    if not text.strip():
        return [], []
    try:
        buses = json.loads(text).get("SPThunderboltDataType") or []
    except (ValueError, AttributeError):
        return [], ["system_profiler's Thunderbolt JSON did not parse"]
    by_port = {str(port): str(dev) for dev, port in hardware_ports.items()}
    ports: list[ThunderboltPort] = []
    notes: list[str] = []
    for bus in buses if isinstance(buses, list) else ():
        if not isinstance(bus, dict) or not bus.get("domain_uuid_key"):
            continue  # a bus without a domain is not a port another Mac can name
        tag = bus.get("receptacle_1_tag") if isinstance(bus.get("receptacle_1_tag"), dict) else {}
        receptacle = str(tag.get("receptacle_id_key") or "")
        iface = by_port.get(f"Thunderbolt {receptacle}") if receptacle else None
        if receptacle and iface is None:
            notes.append(f"Thunderbolt port {receptacle} has no network device in networksetup")
        peer = next((i for i in bus.get("_items") or () if isinstance(i, dict) and i.get("domain_uuid_key")), {})
        ports.append(ThunderboltPort(
            receptacle=receptacle, uid=str(bus["domain_uuid_key"]), iface=iface,
            peer_uid=str(peer["domain_uuid_key"]) if peer else None,
            peer_name=str(peer.get("_name") or peer.get("device_name_key") or "") or None,
            speed=str(tag["current_speed_key"]) if tag.get("current_speed_key") else None))
    return sorted(ports, key=lambda p: (p.iface or "~", p.receptacle)), notes


@dataclass(frozen=True, slots=True)
class RdmaLink:
    """One cable end: `host`'s port facing `peer` (a host name), and that port's RDMA device if any."""

    host: str
    peer: str
    port: ThunderboltPort
    device: RdmaDevice | None

    @property
    def usable(self) -> bool:
        return self.device is not None and self.device.active

    def problem(self) -> str:
        """Why this end cannot carry RDMA ("" when it can)."""
        if self.device is None:
            return f"{self.host} has no RDMA device for {self.port.iface or 'Thunderbolt ' + self.port.receptacle}"
        if not self.device.active:
            return f"{self.device.name} on {self.host} is {self.device.state}"
        return ""


def peer_links(facts: Mapping[str, RdmaFacts]) -> dict[tuple[str, str], list[RdmaLink]]:
    """{(host, peer): the host's cable ends facing that peer}, by matching Thunderbolt UIDs across hosts."""
    owner = {port.uid: name for name, f in facts.items() for port in f.ports}
    links: dict[tuple[str, str], list[RdmaLink]] = {}
    for name, f in facts.items():
        for port in f.ports:
            peer = owner.get(port.peer_uid or "")
            if peer is not None and peer != name:
                links.setdefault((name, peer), []).append(RdmaLink(name, peer, port, f.device_for(port.iface)))
    return links


def describe_ports(name: str, facts: Mapping[str, RdmaFacts]) -> list[str]:
    """One line per RDMA device of `name` for the preflight table: "rdma_en3 active → mini2"."""
    f = facts.get(name)
    if f is None:
        return []
    owner = {port.uid: host for host, other in facts.items() for port in other.ports}
    facing = {}
    for port in f.ports:
        dev = f.device_for(port.iface)
        if dev is not None:
            peer = owner.get(port.peer_uid or "") or port.peer_name
            facing[dev.name] = f"→ {peer}" if peer else "(no cable)"
    return [f"{d.name} {d.state} {facing.get(d.name, '')}".rstrip() for d in f.devices]


def best_link(links: Sequence[RdmaLink]) -> RdmaLink | None:
    """The usable cable end with the lowest device name (several cables between two Macs: one is used)."""
    usable = sorted((link for link in links if link.usable), key=lambda link: link.device.name)  # type: ignore[union-attr]
    return usable[0] if usable else None


__all__ = ["ACTIVE", "RdmaDevice", "RdmaFacts", "RdmaLink", "ThunderboltPort", "best_link", "describe_ports",
           "parse_ibv_devices", "parse_ibv_devinfo", "parse_thunderbolt", "peer_links"]
