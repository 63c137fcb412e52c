"""Plan Thunderbolt islands: per-step DDP inside each set of cabled Macs, DiLoCo between the sets.

In a room where some Macs share Thunderbolt cables and the others are only on Wi-Fi, one ring over all
of them runs at Wi-Fi speed. Instead each island (hosts with a cabled ring, or a cabled pair) all-reduces
every step over its cables, and the islands' leaders exchange DiLoCo pseudo-gradients in one ring over
the network (docs/islands.md, "Choosing: the planner"). This module only plans that, from the same
inputs as `topology.plan_ring`, and says None when the island plan would be today's flat plan.

Pure: no sockets, no commands, deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from distributed.errors import HostError
from distributed.topology import RingHost, RingPlan, plan_ring, shared_thunderbolt


@dataclass(frozen=True, slots=True)
class Island:
    """Hosts that all-reduce every step over their own Thunderbolt ring (or one host over loopback)."""

    hosts: tuple[str, ...]  # host names in ring order; hosts[0]'s first rank leads the island
    ring: RingPlan  # plan_ring over the hosts: link "thunderbolt", or "local" for one host


@dataclass(frozen=True, slots=True)
class IslandPlan:
    """The islands and the leaders' ring that joins them."""

    islands: tuple[Island, ...]  # ordered by where each island's first host appears in the input
    leaders: RingPlan  # one rank per island (its first host), over network addresses; rank i leads island i

    def island_of(self, host: str) -> int:
        """Index of the island holding `host`."""
        for i, island in enumerate(self.islands):
            if host in island.hosts:
                return i
        raise KeyError(f"{host!r} is in no island")

    def island_rank(self, host: str, local_rank: int) -> int:
        """Rank of (host, local_rank) in its island's ring: numbered host by host in ring order."""
        rank_hosts = self.islands[self.island_of(host)].ring.rank_hosts
        if not 0 <= local_rank < rank_hosts.count(host):
            raise IndexError(f"{host} has {rank_hosts.count(host)} ranks, not a local rank {local_rank}")
        return rank_hosts.index(host) + local_rank

    def is_leader(self, host: str, local_rank: int) -> bool:
        """Whether (host, local_rank) is its island's rank 0, the one in the leaders' ring."""
        return self.island_rank(host, local_rank) == 0

    def describe(self) -> str:
        """One line for the plan panel, e.g. "islands: {h0 h1} over Thunderbolt, {h2}, {h3}: DDP inside ..."."""
        parts = []
        for island in self.islands:
            if len(island.hosts) > 1:
                parts.append("{" + " ".join(island.hosts) + "} over Thunderbolt")
            else:
                ranks = len(island.ring.rank_hosts)
                parts.append("{" + island.hosts[0] + (f" ×{ranks}" if ranks > 1 else "") + "}")
        return f"islands: {', '.join(parts)}: DDP inside each, DiLoCo between them over the network"


def plan_islands(hosts: Sequence[RingHost]) -> IslandPlan | None:
    """Split the hosts into Thunderbolt islands, or None when islands would not help.

    Islands are the connected components of "shares a Thunderbolt subnet" (`shared_thunderbolt`) that
    have a cabled ring; a component without one (three Macs in a line) is cut into cabled pairs greedily
    in input order, because a ring with one Wi-Fi hop runs at Wi-Fi speed. None when there are fewer
    than two hosts, when nothing is cabled (every island has one host: the flat network plan is right)
    or when all hosts form one island (the Thunderbolt ring is right).
    """
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise HostError(f"host names repeat: {', '.join(names)}", hint="give every host a unique name")
    if len(hosts) < 2:
        return None
    n = len(hosts)
    linked = [[i != j and shared_thunderbolt(hosts[i].links, hosts[j].links) is not None for j in range(n)]
              for i in range(n)]
    groups: list[list[int]] = []  # host indices of each island, each in input order
    for component in _components(linked):
        try:
            plan_ring([hosts[i] for i in component], "thunderbolt")
            groups.append(component)
        except HostError:
            groups.extend(_pairs(component, linked))
    if len(groups) == 1 or all(len(g) == 1 for g in groups):
        return None
    groups.sort(key=lambda g: g[0])
    islands = []
    for group in groups:
        members = [hosts[i] for i in group]
        ring = plan_ring(members, "thunderbolt" if len(members) > 1 else "auto")
        islands.append(Island(ring.order, ring))
    by_name = {h.name: h for h in hosts}
    leaders = plan_ring([RingHost(lead.name, 1, lead.address, lead.links)
                         for lead in (by_name[island.hosts[0]] for island in islands)], "network")
    return IslandPlan(tuple(islands), leaders)


def _components(linked: list[list[bool]]) -> list[list[int]]:
    """Connected components, each listed where its first host appears, its members in input order."""
    seen: set[int] = set()
    components = []
    for start in range(len(linked)):
        if start in seen:
            continue
        stack, members = [start], {start}
        while stack:
            i = stack.pop()
            for j, edge in enumerate(linked[i]):
                if edge and j not in members:
                    members.add(j)
                    stack.append(j)
        seen |= members
        components.append(sorted(members))
    return components


def _pairs(component: list[int], linked: list[list[bool]]) -> list[list[int]]:
    """Cabled pairs, greedily in input order: each unpaired host takes its first unpaired neighbour."""
    paired: set[int] = set()
    groups = []
    for i in component:
        if i in paired:
            continue
        mate = next((j for j in component if j not in paired and j != i and linked[i][j]), None)
        paired.add(i)
        if mate is None:
            groups.append([i])
        else:
            paired.add(mate)
            groups.append([i, mate])
    return groups


__all__ = ["Island", "IslandPlan", "plan_islands"]
