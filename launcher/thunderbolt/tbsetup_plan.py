"""Plan `macrun hosts setup-thunderbolt`: which cable joins which hosts, one /30 per cable, and the commands.

Pure: it works on what the hosts reported (launcher/thunderbolt/tbsetup_parse.py) and on the record of an earlier set-up
(kept in hosts.json under "_thunderbolt"), so every decision is a unit test.

- Cables: on a Mac, system_profiler's Thunderbolt UIDs say which port faces which Mac (launcher/thunderbolt/rdma.py, as
  `mlx.distributed_config` maps them); elsewhere, and for ports the UIDs leave open, an interface faces the
  host whose MAC appears in its IPv6 neighbour table after a multicast echo.
- Addresses: one /30 per cable from POOLS, the first that overlaps no subnet any host has (so a cable never
  shadows a LAN route), in a fixed order, so the same room gets the same addresses every time; a cable
  macrun set up before keeps its addresses, and a cable a person already addressed by hand is left alone.
- Actions are the difference between that plan and what the hosts have, so a second `--apply` has none.
  What macrun adds is recorded (addresses, bridge members it took out, bridges it took down), and `--undo`
  reverses exactly that, skipping what is already back.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from launcher.thunderbolt.tbsetup_parse import HostNet

# Searched in this order; 192.168.0-1.x and 10.0.x.x (home routers) and 172.17 (Docker) come late or never.
POOLS = ("10.100.0.0/16", "10.101.0.0/16", "172.29.0.0/16", "192.168.249.0/24")
LINK_LOCAL = ipaddress.ip_network("169.254.0.0/16")

ADD, DEL, LEAVE, JOIN, DOWN, UP = "add", "del", "leave", "join", "down", "up"
_LINUX = {ADD: "ip addr add {address} dev {iface}", DEL: "ip addr del {address} dev {iface}",
          LEAVE: "ip link set dev {iface} nomaster", JOIN: "ip link set dev {iface} master {bridge}",
          DOWN: "ip link set dev {iface} down", UP: "ip link set dev {iface} up"}
_MACOS = {ADD: "ifconfig {iface} inet {ip} netmask {netmask} alias", DEL: "ifconfig {iface} inet {ip} -alias",
          LEAVE: "ifconfig {bridge} deletem {iface}", JOIN: "ifconfig {bridge} addm {iface}",
          DOWN: "ifconfig {iface} down", UP: "ifconfig {iface} up"}


@dataclass(frozen=True, slots=True, order=True)
class End:
    """One end of a cable: a host and its interface there."""

    host: str
    iface: str

    def __str__(self) -> str:
        return f"{self.host} {self.iface}"


@dataclass(frozen=True, slots=True)
class Cable:
    """A Thunderbolt cable between two hosts; `a` is the end on the host listed first in hosts.json."""

    a: End
    b: End
    found_by: str  # "Thunderbolt UIDs" | "IPv6 neighbours"


@dataclass(frozen=True, slots=True)
class CablePlan:
    """A cable and its /30: `a_ip` and `b_ip` like "10.100.0.1/30"."""

    cable: Cable
    a_ip: str
    b_ip: str
    state: str  # "by hand" (addressed before, not by macrun: left alone) | "in place" | "to add"


@dataclass(frozen=True, slots=True)
class Action:
    """One change on one host; `command` spells it for that host's OS."""

    verb: str  # ADD, DEL, LEAVE, JOIN, DOWN, UP
    iface: str  # the interface (the bridge itself for DOWN and UP)
    address: str = ""  # "a.b.c.d/30" for ADD and DEL
    bridge: str = ""  # for LEAVE and JOIN

    def command(self, system: str) -> str:
        """The command line, without sudo: `ip` on Linux, `ifconfig` on macOS."""
        iface = ipaddress.ip_interface(self.address) if self.address else None
        return (_MACOS if system == "Darwin" else _LINUX)[self.verb].format(
            iface=self.iface, address=self.address, bridge=self.bridge, ip=iface.ip if iface else "",
            netmask=iface.netmask if iface else "")


@dataclass(frozen=True, slots=True)
class HostRecord:
    """What macrun changed on one host, so that --undo reverses exactly that."""

    addresses: tuple[tuple[str, str], ...] = ()  # (iface, "a.b.c.d/30") macrun added
    left: tuple[tuple[str, str], ...] = ()  # (bridge, iface) macrun took the interface out of
    downed: tuple[str, ...] = ()  # bridges macrun took down

    def __bool__(self) -> bool:
        return bool(self.addresses or self.left or self.downed)

    def to_json(self) -> dict[str, Any]:
        return {"addresses": [list(a) for a in self.addresses], "left_bridges": [list(m) for m in self.left],
                "bridges_down": list(self.downed)}

    @classmethod
    def from_json(cls, data: Any) -> HostRecord:
        """Read `to_json`'s form; anything malformed reads as nothing recorded rather than failing."""
        if not isinstance(data, Mapping):
            return cls()

        def pairs(key: str) -> tuple[tuple[str, str], ...]:
            items = data.get(key) or ()
            return tuple((str(p[0]), str(p[1])) for p in items if isinstance(p, list | tuple) and len(p) == 2)

        downed = data.get("bridges_down") or ()
        return cls(pairs("addresses"), pairs("left_bridges"), tuple(str(b) for b in downed if isinstance(b, str)))


@dataclass(frozen=True, slots=True)
class SetupPlan:
    """The cables with their addresses, each host's actions (in order) and the record once they ran."""

    cables: tuple[CablePlan, ...]
    actions: Mapping[str, tuple[Action, ...]]
    record: Mapping[str, HostRecord]
    notes: tuple[str, ...] = ()
    loose: tuple[End, ...] = field(default=())  # Thunderbolt ports up but facing no host of the file

    @property
    def changes(self) -> int:
        return sum(len(a) for a in self.actions.values())

    def fast_ips(self) -> dict[str, tuple[str, ...]]:
        """{host: its cable addresses, without prefix}: what hosts.json's fast_ips get."""
        out: dict[str, list[str]] = {}
        for c in self.cables:
            for end, ip in ((c.cable.a, c.a_ip), (c.cable.b, c.b_ip)):
                out.setdefault(end.host, []).append(ip.split("/")[0])
        return {h: tuple(ips) for h, ips in out.items()}


# ---- cables ---------------------------------------------------------------------------------------------

def find_cables(order: Sequence[str], nets: Mapping[str, HostNet]) -> tuple[list[Cable], list[End]]:
    """The cables between the hosts (Thunderbolt UIDs first, then MACs in the IPv6 neighbour tables) and the
    Thunderbolt ports that are up but lead to no host of the file (or whose peer was not found)."""
    rank = {name: i for i, name in enumerate(order)}
    cables: list[Cable] = []
    taken: set[End] = set()

    def add(x: End, y: End, how: str) -> None:
        if x.host == y.host or x in taken or y in taken:
            return
        a, b = (x, y) if (rank[x.host], x.iface) <= (rank[y.host], y.iface) else (y, x)
        cables.append(Cable(a, b, how))
        taken.update((a, b))

    owner = {p.uid: (name, p) for name in order for p in nets[name].ports}
    for name in order:
        for port in nets[name].ports:
            peer = owner.get(port.peer_uid or "")
            if peer is not None and port.iface and peer[1].iface:
                add(End(name, port.iface), End(peer[0], peer[1].iface), "Thunderbolt UIDs")
    by_mac = {i.mac: End(name, i.name) for name in order for i in nets[name].thunderbolt if i.mac}
    for name in order:
        net = nets[name]
        own = {i.mac for i in net.ifaces if i.mac}
        for iface in net.thunderbolt:
            for mac in net.neighbours.get(iface.name, ()):
                if mac not in own and mac in by_mac:
                    add(End(name, iface.name), by_mac[mac], "IPv6 neighbours")
    loose = [End(name, i.name) for name in order for i in nets[name].thunderbolt
             if i.up and End(name, i.name) not in taken and _has_peer(nets[name], i.name)]
    cables.sort(key=lambda c: (rank[c.a.host], c.a.iface, rank[c.b.host], c.b.iface))
    return cables, loose


def _has_peer(net: HostNet, iface: str) -> bool:
    """Something is plugged into this port: a Mac per system_profiler, or a neighbour answered."""
    own = {i.mac for i in net.ifaces if i.mac}
    if any(p.iface == iface and p.peer_uid for p in net.ports):
        return True
    return any(m not in own for m in net.neighbours.get(iface, ()))


# ---- addresses and actions ------------------------------------------------------------------------------

def candidate_subnets(taken: Sequence[ipaddress.IPv4Network]) -> Iterator[ipaddress.IPv4Network]:
    """Every /30 of POOLS, in order, that overlaps none of `taken`."""
    for pool_text in POOLS:
        pool = ipaddress.ip_network(pool_text)
        if any(pool.subnet_of(t) for t in taken if t.version == 4):  # the whole pool is someone's LAN
            continue
        near = [t for t in taken if t.version == 4 and t.overlaps(pool)]
        for subnet in pool.subnets(new_prefix=30):
            if not any(subnet.overlaps(t) for t in near):
                yield subnet


def plan_setup(order: Sequence[str], nets: Mapping[str, HostNet], cables: Sequence[Cable],
               previous: Mapping[str, HostRecord], loose: Sequence[End] = ()) -> SetupPlan:
    """Addresses for every cable and the actions that make the hosts match (see the module docstring)."""
    ours = {(h, iface, a) for h, rec in previous.items() for iface, a in rec.addresses}
    present = {(h, i.name, a) for h, net in nets.items() for i in net.ifaces for a in i.ipv4}
    foreign = [ipaddress.ip_interface(a).network for h, i, a in present if (h, i, a) not in ours]
    chosen: dict[Cable, tuple[str, str, str]] = {}
    for cable in cables:  # first what stays: cables addressed by hand, then macrun's own earlier choice
        live = [[a for a in _ipv4(nets[e.host], e.iface) if (e.host, e.iface, a) not in ours]
                for e in (cable.a, cable.b)]
        by_hand = _pair_in_one_subnet(*live)
        if by_hand is not None:
            chosen[cable] = (*by_hand, "by hand")
            continue
        recorded = [[a for i, a in previous.get(e.host, HostRecord()).addresses if i == e.iface]
                    for e in (cable.a, cable.b)]
        before = _pair_in_one_subnet(*recorded)
        if before is not None and not any(ipaddress.ip_interface(before[0]).network.overlaps(f) for f in foreign):
            chosen[cable] = (*before, "")
    reserved = {ipaddress.ip_interface(a).network for a, _, _ in chosen.values()}
    fresh = (s for s in candidate_subnets(foreign) if s not in reserved)
    plans: list[CablePlan] = []
    for cable in cables:
        if cable not in chosen:
            first, second = list(next(fresh).hosts())
            chosen[cable] = (f"{first}/30", f"{second}/30", "")
        a_ip, b_ip, state = chosen[cable]
        if not state:
            done = (cable.a.host, cable.a.iface, a_ip) in present and (cable.b.host, cable.b.iface, b_ip) in present
            state = "in place" if done else "to add"
        plans.append(CablePlan(cable, a_ip, b_ip, state))
    actions, record = _actions(order, nets, plans, previous, present)
    notes = [f"{e.host}: {e.iface} leads to no host of the hosts file (or its peer did not answer)" for e in loose]
    return SetupPlan(tuple(plans), actions, record, tuple(notes), tuple(loose))


def _ipv4(net: HostNet, iface: str) -> tuple[str, ...]:
    found = net.iface(iface)
    return found.ipv4 if found is not None else ()


def _pair_in_one_subnet(a_side: Sequence[str], b_side: Sequence[str]) -> tuple[str, str] | None:
    """(a's address, b's address) in one subnet, the first such pair; link-local never counts (every
    macOS Thunderbolt Bridge self-assigns one, which proves no direct cable)."""
    for a in a_side:
        for b in b_side:
            na, nb = ipaddress.ip_interface(a), ipaddress.ip_interface(b)
            if na.network == nb.network and na.ip != nb.ip and not na.network.subnet_of(LINK_LOCAL):
                return a, b
    return None


def _actions(order: Sequence[str], nets: Mapping[str, HostNet], plans: Sequence[CablePlan],
             previous: Mapping[str, HostRecord], present: set[tuple[str, str, str]],
             ) -> tuple[dict[str, tuple[Action, ...]], dict[str, HostRecord]]:
    wanted: dict[str, list[tuple[str, str]]] = {}
    for p in plans:
        if p.state != "by hand":
            wanted.setdefault(p.cable.a.host, []).append((p.cable.a.iface, p.a_ip))
            wanted.setdefault(p.cable.b.host, []).append((p.cable.b.iface, p.b_ip))
    actions: dict[str, tuple[Action, ...]] = {}
    record: dict[str, HostRecord] = {}
    for host in order:
        net, prev, want = nets[host], previous.get(host, HostRecord()), wanted.get(host, [])
        todo = [Action(DEL, i, a) for i, a in prev.addresses if (i, a) not in want and (host, i, a) in present]
        left = list(prev.left)
        for iface, _ in want:
            for bridge in net.bridges_of(iface):
                todo.append(Action(LEAVE, iface, bridge=bridge))
                if (bridge, iface) not in left:
                    left.append((bridge, iface))
        downed = list(prev.downed)
        if net.os == "Darwin":  # the Thunderbolt Bridge: a bridge of Thunderbolt ports only, still up
            for bridge in dict.fromkeys(b for b, _ in left):
                br = net.iface(bridge)
                if br is not None and br.up and _all_thunderbolt(net, br.members):
                    todo.append(Action(DOWN, bridge))
                    if bridge not in downed:
                        downed.append(bridge)
        todo += [Action(ADD, i, a) for i, a in want if (host, i, a) not in present]
        actions[host] = tuple(todo)
        rec = HostRecord(tuple(want), tuple(left), tuple(downed))
        if rec:
            record[host] = rec
    return actions, record


def _all_thunderbolt(net: HostNet, members: Sequence[str]) -> bool:
    return all((m := net.iface(name)) is not None and m.thunderbolt for name in members)


def plan_undo(order: Sequence[str], nets: Mapping[str, HostNet],
              previous: Mapping[str, HostRecord]) -> dict[str, tuple[Action, ...]]:
    """The actions that reverse `previous` where the hosts still show it: addresses removed, members put back
    in their bridges, bridges brought up; what a reboot (or a person) already restored is skipped."""
    out: dict[str, tuple[Action, ...]] = {}
    for host in order:
        rec, net = previous.get(host), nets.get(host)
        if not rec or net is None:
            continue
        todo = [Action(DEL, i, a) for i, a in rec.addresses if (ifc := net.iface(i)) is not None and a in ifc.ipv4]
        todo += [Action(JOIN, i, bridge=b) for b, i in rec.left
                 if net.iface(b) is not None and net.iface(i) is not None and b not in net.bridges_of(i)]
        todo += [Action(UP, b) for b in rec.downed if (br := net.iface(b)) is not None and not br.up]
        out[host] = tuple(todo)
    return out


__all__ = ["ADD", "DEL", "DOWN", "JOIN", "LEAVE", "POOLS", "UP", "Action", "Cable", "CablePlan", "End",
           "HostRecord", "SetupPlan", "candidate_subnets", "find_cables", "plan_setup", "plan_undo"]
