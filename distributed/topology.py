"""Place MLX's ring on the hosts' links: a host order whose neighbours share Thunderbolt, and each rank's address.

MLX's ring backend (checked against MLX 0.32's ring.cpp and in the lab) has rank i *accept* its left
neighbour's connection on the address(es) of hostfile entry i and *connect* to entry i+1. So entry i
must be an address of rank i's own host (it binds to it) that rank i-1 can reach. With a Thunderbolt
cable per pair of neighbours that is the address of rank i's host on the cable towards rank i-1's host;
any other address of that host is on a cable rank i-1 is not plugged into (no route: MLX retries
for 15 s, then fails with "[ring] Couldn't connect (error: 101)" while the other ranks wait forever).

Several ranks on one host get consecutive ranks (launcher.room.hosts.layout_ranks), so only the first rank of
each host has its left neighbour on another host. The others have their left neighbour on the same host
and list 127.0.0.1: the kernel carries traffic between a host's own processes over loopback whatever
address they use, and loopback needs no cable or configured address.

Thunderbolt neighbours are found by subnet: two hosts share a Thunderbolt link when each has an up
Thunderbolt interface with an IPv4 address in one subnet. A point-to-point cable with its own subnet
(10.x.y.0/30, what the lab and a manual set-up use) proves a direct cable; macOS's self-assigned
169.254.0.0/16 does not (every Thunderbolt Bridge gets one), but then the hosts do sit on one bridged
Thunderbolt segment and can reach each other over it.

Pure: no sockets, no commands. The launcher feeds it what preflight reported.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from distributed.errors import HostError
from distributed.links import Link, thunderbolt_links

LOOPBACK = "127.0.0.1"
MODES = ("auto", "thunderbolt", "network")
SEARCH_BUDGET = 200_000  # ring orders tried before giving up (a room of Macs is far below it)


@dataclass(frozen=True, slots=True)
class RingHost:
    """One host as the planner sees it."""

    name: str
    slots: int  # ranks on this host
    address: str  # where other hosts reach it over the network (its SSH address or hosts.json "ips")
    links: tuple[Link, ...] = ()  # its interfaces, as probed


@dataclass(frozen=True, slots=True)
class RingPlan:
    """Where the ring runs: the host order, each rank's hostfile address, and why."""

    link: str  # "thunderbolt" | "network" | "local" (one host): MACRUN_LINK for every rank
    order: tuple[str, ...]  # host names in ring order; ranks are numbered host by host in this order
    rank_hosts: tuple[str, ...]  # host name of each rank
    addresses: tuple[str, ...]  # each rank's own address for the MLX hostfile (see the module docstring)
    reason: str  # one line: why this link

    def describe(self) -> str:
        """One line for the launch log, e.g. "ring over Thunderbolt: h0 10.0.3.2 → h1 10.0.1.2 → h2 ..."."""
        if self.link == "local":
            return f"ring on one host ({self.order[0]}, {len(self.rank_hosts)} ranks over loopback)"
        hops = []
        for host in self.order:
            first = self.rank_hosts.index(host)
            count = self.rank_hosts.count(host)
            hops.append(f"{host} {self.addresses[first]}" + (f" (×{count})" if count > 1 else ""))
        ring = " → ".join([*hops, self.order[0]])
        if self.link == "thunderbolt":
            return f"ring over Thunderbolt: {ring}"
        return f"ring over the network: {self.reason} ({ring})"


def shared_thunderbolt(a: Sequence[Link], b: Sequence[Link]) -> tuple[str, str] | None:
    """(a's address, b's address) on a Thunderbolt subnet both hosts have up, or None.

    When several subnets are shared the narrowest wins (a /30 cable beats a /16 link-local segment), then
    the lowest address, so the choice is the same on every run.
    """
    best: tuple[int, ipaddress.IPv4Address, str, str] | None = None
    for link_a in thunderbolt_links(a):
        for ia in link_a.interfaces:
            for link_b in thunderbolt_links(b):
                for ib in link_b.interfaces:
                    if ia.network == ib.network and ia.ip != ib.ip:
                        key = (-ia.network.prefixlen, ia.ip, str(ia.ip), str(ib.ip))
                        if best is None or key[:2] < best[:2]:
                            best = key
    return (best[2], best[3]) if best else None


def plan_ring(hosts: Sequence[RingHost], mode: str = "auto") -> RingPlan:
    """Order the hosts and pick every rank's ring address.

    mode "auto": over Thunderbolt when some order of the hosts (the first host stays first, so rank 0 does
    not move; the file's order is kept when it works) has a Thunderbolt link between every pair of ring
    neighbours, the last and the first included; otherwise over the network addresses, in file order,
    with the reason. "network" always uses the network; "thunderbolt" raises HostError naming the missing
    link instead of falling back.
    """
    if mode not in MODES:
        raise HostError(f"unknown link mode {mode!r}", hint=f"use one of: {', '.join(MODES)}")
    if not hosts:
        raise HostError("no hosts to place the ring on", hint="list at least one host in hosts.json")
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise HostError(f"host names repeat: {', '.join(names)}", hint="give every host a unique name")
    if len(hosts) == 1:
        host = hosts[0]
        return RingPlan("local", (host.name,), (host.name,) * host.slots, (LOOPBACK,) * host.slots,
                        "one host: its ranks talk over loopback")
    if mode == "network":
        return _network_plan(hosts, "--link network")
    order, reason = _thunderbolt_order(hosts)
    if order is None:
        if mode == "thunderbolt":
            raise HostError(f"cannot run the ring over Thunderbolt: {reason}",
                            hint="connect those hosts with a Thunderbolt cable and give the Thunderbolt Bridge "
                                 "an IPv4 address on both (System Settings > Network), or use --link auto")
        return _network_plan(hosts, reason)
    by_name = {h.name: h for h in hosts}
    ordered = [by_name[n] for n in order]
    left_address = {}
    for i, host in enumerate(ordered):
        pair = shared_thunderbolt(host.links, ordered[i - 1].links)
        assert pair is not None  # _thunderbolt_order checked every neighbour pair
        left_address[host.name] = pair[0]
    return _plan("thunderbolt", ordered, left_address, "every pair of ring neighbours shares a Thunderbolt link")


def _network_plan(hosts: Sequence[RingHost], reason: str) -> RingPlan:
    return _plan("network", hosts, {h.name: h.address for h in hosts}, reason)


def _plan(link: str, ordered: Sequence[RingHost], left_address: Mapping[str, str], reason: str) -> RingPlan:
    rank_hosts: list[str] = []
    addresses: list[str] = []
    for host in ordered:
        for local in range(host.slots):
            rank_hosts.append(host.name)
            # The first rank's left neighbour is on the previous host; the others' is on this one.
            addresses.append(left_address[host.name] if local == 0 else LOOPBACK)
    return RingPlan(link, tuple(h.name for h in ordered), tuple(rank_hosts), tuple(addresses), reason)


def _thunderbolt_order(hosts: Sequence[RingHost]) -> tuple[list[str] | None, str]:
    """A Hamiltonian cycle of the Thunderbolt graph starting at the first host, or None and why not."""
    names = [h.name for h in hosts]
    bare = [h.name for h in hosts if not thunderbolt_links(h.links)]
    if bare:
        return None, (f"{_listing(bare)} {'has' if len(bare) == 1 else 'have'} no Thunderbolt link up with an "
                      "IPv4 address")
    n = len(hosts)
    linked = [[shared_thunderbolt(hosts[i].links, hosts[j].links) is not None for j in range(n)] for i in range(n)]
    path, used, budget = [0], {0}, [SEARCH_BUDGET]

    def extend() -> bool:
        # Depth first, candidates in file order: the file's own order is the first one tried.
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if len(path) == n:
            return linked[path[-1]][0]
        for j in range(n):
            if j not in used and linked[path[-1]][j]:
                path.append(j)
                used.add(j)
                if extend():
                    return True
                path.pop()
                used.discard(j)
        return False

    if extend():
        return [names[i] for i in path], ""
    if budget[0] < 0:
        return None, f"no Thunderbolt ring found among {n} hosts within the search budget"
    # The file's order was tried first, so it has a gap: name it, it is the pair a person would cable next.
    i = next(i for i in range(n) if not linked[i][(i + 1) % n])
    others = ", and no other order of the hosts closes a ring" if n > 3 else ""
    return None, f"no Thunderbolt link between {names[i]} and {names[(i + 1) % n]}{others}"


def _listing(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


__all__ = ["LOOPBACK", "MODES", "RingHost", "RingPlan", "plan_ring", "shared_thunderbolt"]
