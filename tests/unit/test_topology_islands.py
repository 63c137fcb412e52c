"""distributed/topology_islands.py: Thunderbolt islands, the leaders' ring, and when islands do not help."""

from __future__ import annotations

import pytest

from distributed.errors import HostError
from distributed.links import Link
from distributed.topology import LOOPBACK, RingHost
from distributed.topology_islands import plan_islands

WIFI = {"h0": "192.168.1.10", "h1": "192.168.1.11", "h2": "192.168.1.12", "h3": "192.168.1.13",
        "h4": "192.168.1.14"}


def tb(name: str, *ipv4: str) -> Link:
    return Link(name, "thunderbolt", ipv4, True)


def host(name: str, *links: Link, slots: int = 1) -> RingHost:
    wifi = Link("en0", "wifi", (f"{WIFI[name]}/24",))
    return RingHost(name, slots, WIFI[name], (Link("lo0", "loopback", ("127.0.0.1/8",)), wifi, *links))


def pair(a: str, b: str, subnet: int, slots_a: int = 1) -> list[RingHost]:
    """Two hosts on one cable: a has 10.9.<subnet>.1, b has .2, one /30."""
    return [host(a, tb("thunderbolt0", f"10.9.{subnet}.1/30"), slots=slots_a),
            host(b, tb("thunderbolt1", f"10.9.{subnet}.2/30"))]


def test_a_cabled_pair_and_two_wifi_hosts_make_three_islands() -> None:
    plan = plan_islands([*pair("h0", "h1", 1), host("h2"), host("h3")])
    assert plan is not None
    assert [island.hosts for island in plan.islands] == [("h0", "h1"), ("h2",), ("h3",)]
    cabled = plan.islands[0].ring
    # Each host lists its own address on the cable towards its left neighbour (on a 2-ring: the one cable).
    assert cabled.link == "thunderbolt" and cabled.addresses == ("10.9.1.1", "10.9.1.2")
    assert plan.islands[1].ring.link == "local" and plan.islands[1].ring.addresses == (LOOPBACK,)
    assert plan.leaders.link == "network" and plan.leaders.order == ("h0", "h2", "h3")
    assert plan.leaders.addresses == (WIFI["h0"], WIFI["h2"], WIFI["h3"])
    assert [plan.island_of(h) for h in ("h0", "h1", "h2", "h3")] == [0, 0, 1, 2]
    assert [plan.island_rank(h, 0) for h in ("h0", "h1", "h2", "h3")] == [0, 1, 0, 0]
    assert [plan.is_leader(h, 0) for h in ("h0", "h1", "h2", "h3")] == [True, False, True, True]
    assert plan.describe() == ("islands: {h0 h1} over Thunderbolt, {h2}, {h3}: "
                               "DDP inside each, DiLoCo between them over the network")


def test_two_cabled_pairs_are_two_islands() -> None:
    plan = plan_islands([*pair("h0", "h1", 1), *pair("h2", "h3", 2)])
    assert plan is not None
    assert [island.hosts for island in plan.islands] == [("h0", "h1"), ("h2", "h3")]
    assert plan.islands[1].ring.addresses == ("10.9.2.1", "10.9.2.2")
    assert plan.leaders.order == ("h0", "h2") and plan.leaders.addresses == (WIFI["h0"], WIFI["h2"])
    assert plan.is_leader("h2", 0) and not plan.is_leader("h3", 0)


def square() -> list[RingHost]:
    """h0-h1-h2-h3-h0, one /30 per cable."""
    return [host("h0", tb("thunderbolt0", "10.9.1.1/30"), tb("thunderbolt1", "10.9.4.2/30")),
            host("h1", tb("thunderbolt1", "10.9.1.2/30"), tb("thunderbolt0", "10.9.2.1/30")),
            host("h2", tb("thunderbolt1", "10.9.2.2/30"), tb("thunderbolt0", "10.9.3.1/30")),
            host("h3", tb("thunderbolt1", "10.9.3.2/30"), tb("thunderbolt0", "10.9.4.1/30"))]


def test_islands_do_not_help_when_all_cabled_nothing_cabled_or_one_host() -> None:
    assert plan_islands(square()) is None  # one island: today's Thunderbolt ring
    assert plan_islands([host(h) for h in ("h0", "h1", "h2", "h3")]) is None  # today's network ring
    assert plan_islands([host("h0")]) is None
    assert plan_islands([]) is None


def test_three_in_a_line_are_cut_into_a_pair_and_a_singleton() -> None:
    line = [host("h0", tb("thunderbolt0", "10.9.1.1/30")),
            host("h1", tb("thunderbolt1", "10.9.1.2/30"), tb("thunderbolt0", "10.9.2.1/30")),
            host("h2", tb("thunderbolt1", "10.9.2.2/30")),  # no cable back to h0
            host("h3")]
    plan = plan_islands(line)
    assert plan is not None
    assert [island.hosts for island in plan.islands] == [("h0", "h1"), ("h2",), ("h3",)]
    assert plan.islands[0].ring.addresses == ("10.9.1.1", "10.9.1.2")
    assert plan.leaders.order == ("h0", "h2", "h3")


def test_four_in_a_line_are_two_pairs() -> None:
    hosts = square()
    hosts[0] = host("h0", tb("thunderbolt0", "10.9.1.1/30"))  # the h3-h0 cable is out
    plan = plan_islands(hosts)
    assert plan is not None
    assert [island.hosts for island in plan.islands] == [("h0", "h1"), ("h2", "h3")]
    assert plan.islands[1].ring.addresses == ("10.9.3.1", "10.9.3.2")


def test_islands_follow_the_input_order_when_the_cabled_hosts_come_last() -> None:
    plan = plan_islands([host("h0"), host("h1"), *pair("h2", "h3", 1)])
    assert plan is not None
    assert [island.hosts for island in plan.islands] == [("h0",), ("h1",), ("h2", "h3")]
    assert plan.leaders.order == ("h0", "h1", "h2")
    assert plan.island_of("h3") == 2 and plan.island_rank("h3", 0) == 1


def test_a_cabled_triangle_keeps_its_ring_order_and_addresses() -> None:
    # Listed h0, h2, h1 with a Wi-Fi host between: the island still starts at h0 and closes a cabled ring.
    hosts = [host("h0", tb("thunderbolt0", "10.9.1.1/30"), tb("thunderbolt1", "10.9.3.2/30")),
             host("h4"),
             host("h2", tb("thunderbolt1", "10.9.2.2/30"), tb("thunderbolt0", "10.9.3.1/30")),
             host("h1", tb("thunderbolt1", "10.9.1.2/30"), tb("thunderbolt0", "10.9.2.1/30"))]
    plan = plan_islands(hosts)
    assert plan is not None
    assert [island.hosts for island in plan.islands] == [("h0", "h2", "h1"), ("h4",)]
    # h0 towards h1 (its left neighbour on the ring h0 → h2 → h1), h2 towards h0, h1 towards h2.
    assert plan.islands[0].ring.addresses == ("10.9.1.1", "10.9.3.1", "10.9.2.1")


def test_a_host_with_two_slots_numbers_its_ranks_in_its_island() -> None:
    plan = plan_islands([*pair("h0", "h1", 1, slots_a=2), host("h2", slots=2)])
    assert plan is not None
    ring = plan.islands[0].ring
    assert ring.rank_hosts == ("h0", "h0", "h1")
    assert ring.addresses == ("10.9.1.1", LOOPBACK, "10.9.1.2")
    assert [plan.island_rank("h0", 0), plan.island_rank("h0", 1), plan.island_rank("h1", 0)] == [0, 1, 2]
    assert plan.is_leader("h0", 0) and not plan.is_leader("h0", 1)
    assert plan.island_rank("h2", 1) == 1 and plan.islands[1].ring.addresses == (LOOPBACK, LOOPBACK)
    assert plan.leaders.rank_hosts == ("h0", "h2")  # one leader rank per island
    assert plan.describe() == ("islands: {h0 h1} over Thunderbolt, {h2 ×2}: "
                               "DDP inside each, DiLoCo between them over the network")
    with pytest.raises(IndexError):
        plan.island_rank("h1", 1)
    with pytest.raises(KeyError):
        plan.island_of("h9")


def test_repeated_host_names_are_an_error() -> None:
    with pytest.raises(HostError, match="host names repeat"):
        plan_islands([host("h0"), host("h0")])
