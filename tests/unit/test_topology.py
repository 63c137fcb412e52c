"""distributed/topology.py: ring order over Thunderbolt, each rank's hostfile address, and the fallbacks."""

from __future__ import annotations

import pytest

from distributed.errors import HostError
from distributed.links import Link
from distributed.topology import RingHost, plan_ring, shared_thunderbolt

WIFI = {"h0": "192.168.1.10", "h1": "192.168.1.11", "h2": "192.168.1.12", "h3": "192.168.1.13"}


def tb(name: str, *ipv4: str, up: bool = True) -> Link:
    return Link(name, "thunderbolt", ipv4, up)


def host(name: str, *links: Link, slots: int = 1) -> RingHost:
    wifi = Link("en0", "wifi", (f"{WIFI[name]}/24",))
    return RingHost(name, slots, WIFI[name], (Link("lo0", "loopback", ("127.0.0.1/8",)), wifi, *links))


def triangle(slots: int = 1) -> list[RingHost]:
    """The lab's wiring: hN's thunderbolt0 meets h(N+1)'s thunderbolt1, one /30 per cable."""
    return [host("h0", tb("thunderbolt0", "10.9.1.1/30"), tb("thunderbolt1", "10.9.3.2/30"), slots=slots),
            host("h1", tb("thunderbolt1", "10.9.1.2/30"), tb("thunderbolt0", "10.9.2.1/30"), slots=slots),
            host("h2", tb("thunderbolt1", "10.9.2.2/30"), tb("thunderbolt0", "10.9.3.1/30"), slots=slots)]


def test_triangle_of_thunderbolt_links_gives_a_thunderbolt_ring() -> None:
    plan = plan_ring(triangle())
    assert plan.link == "thunderbolt" and plan.order == ("h0", "h1", "h2")
    # Rank i lists its own address on the cable towards rank i-1: h0 towards h2, h1 towards h0, h2 towards h1.
    assert plan.addresses == ("10.9.3.2", "10.9.1.2", "10.9.2.2")
    assert plan.describe() == "ring over Thunderbolt: h0 10.9.3.2 → h1 10.9.1.2 → h2 10.9.2.2 → h0"


def test_a_missing_link_falls_back_to_the_network_with_the_reason() -> None:
    hosts = triangle()
    hosts[2] = host("h2", tb("thunderbolt1", "10.9.2.2/30"))  # the h2-h0 cable is out
    plan = plan_ring(hosts)
    assert plan.link == "network"
    assert plan.addresses == (WIFI["h0"], WIFI["h1"], WIFI["h2"]) and plan.order == ("h0", "h1", "h2")
    assert plan.reason == "no Thunderbolt link between h2 and h0"
    assert plan.describe().startswith("ring over the network: no Thunderbolt link between h2 and h0 (h0 192.")


def test_a_link_that_is_down_or_has_no_address_does_not_count() -> None:
    hosts = triangle()
    hosts[1] = host("h1", tb("thunderbolt1", "10.9.1.2/30", up=False), tb("thunderbolt0"))
    plan = plan_ring(hosts)
    assert plan.link == "network"
    assert plan.reason == "h1 has no Thunderbolt link up with an IPv4 address"


def test_forcing_thunderbolt_without_a_ring_is_an_error_naming_the_gap() -> None:
    hosts = triangle()
    hosts[2] = host("h2", tb("thunderbolt1", "10.9.2.2/30"))
    with pytest.raises(HostError, match="cannot run the ring over Thunderbolt: no Thunderbolt link between h2 and h0"):
        plan_ring(hosts, "thunderbolt")
    assert plan_ring(triangle(), "thunderbolt").link == "thunderbolt"


def test_network_mode_ignores_thunderbolt() -> None:
    plan = plan_ring(triangle(), "network")
    assert plan.link == "network" and plan.addresses == (WIFI["h0"], WIFI["h1"], WIFI["h2"])
    assert plan.reason == "--link network"


def test_two_hosts_on_one_cable() -> None:
    hosts = [host("h0", tb("thunderbolt0", "10.9.1.1/30")), host("h1", tb("thunderbolt1", "10.9.1.2/30"))]
    plan = plan_ring(hosts)
    assert plan.link == "thunderbolt" and plan.addresses == ("10.9.1.1", "10.9.1.2")
    unplugged = [hosts[0], host("h1", tb("thunderbolt1", "10.9.5.2/30"))]  # a cable to somewhere else
    assert plan_ring(unplugged).reason == "no Thunderbolt link between h0 and h1"


def test_two_slots_per_host_only_the_first_rank_of_a_host_uses_the_cable() -> None:
    plan = plan_ring(triangle(slots=2))
    assert plan.rank_hosts == ("h0", "h0", "h1", "h1", "h2", "h2")
    # Rank 0's left neighbour is rank 5 on h2, rank 1's is rank 0 on h0 (same host: loopback), ...
    assert plan.addresses == ("10.9.3.2", "127.0.0.1", "10.9.1.2", "127.0.0.1", "10.9.2.2", "127.0.0.1")
    assert plan.describe().startswith("ring over Thunderbolt: h0 10.9.3.2 (×2) → h1 10.9.1.2 (×2)")
    network = plan_ring(triangle(slots=2), "network")
    assert network.addresses == (WIFI["h0"], "127.0.0.1", WIFI["h1"], "127.0.0.1", WIFI["h2"], "127.0.0.1")


def test_one_host_is_a_local_ring_over_loopback() -> None:
    plan = plan_ring([host("h0", slots=3)], "thunderbolt")
    assert plan.link == "local" and plan.addresses == ("127.0.0.1",) * 3
    assert plan.describe() == "ring on one host (h0, 3 ranks over loopback)"


def test_hosts_are_reordered_when_the_file_order_has_no_cable_but_another_order_does() -> None:
    # Cables h0-h1, h1-h2, h2-h3, h3-h0 (a square); the file lists h0, h2, h1, h3.
    square = {"h0": [tb("a", "10.8.1.1/30"), tb("b", "10.8.4.2/30")],
              "h1": [tb("a", "10.8.1.2/30"), tb("b", "10.8.2.1/30")],
              "h2": [tb("a", "10.8.2.2/30"), tb("b", "10.8.3.1/30")],
              "h3": [tb("a", "10.8.3.2/30"), tb("b", "10.8.4.1/30")]}
    hosts = [host(n, *square[n]) for n in ("h0", "h2", "h1", "h3")]
    plan = plan_ring(hosts)
    assert plan.link == "thunderbolt"
    assert plan.order[0] == "h0"  # rank 0 stays where the file put it
    assert plan.order in (("h0", "h1", "h2", "h3"), ("h0", "h3", "h2", "h1"))
    for i, name in enumerate(plan.order):  # every rank's address is on the cable to its left neighbour
        pair = shared_thunderbolt(square[name], square[plan.order[i - 1]])
        assert pair is not None and plan.addresses[i] == pair[0]
    hosts_cut = [host(n, *square[n][:1]) if n == "h3" else host(n, *square[n]) for n in ("h0", "h2", "h1", "h3")]
    cut = plan_ring(hosts_cut)
    assert cut.link == "network"
    assert cut.reason == "no Thunderbolt link between h0 and h2, and no other order of the hosts closes a ring"


def test_shared_thunderbolt_prefers_a_point_to_point_cable_over_link_local() -> None:
    a = [tb("bridge0", "169.254.3.4/16", "10.7.0.1/30")]
    b = [tb("bridge0", "169.254.9.9/16", "10.7.0.2/30")]
    assert shared_thunderbolt(a, b) == ("10.7.0.1", "10.7.0.2")
    assert shared_thunderbolt([tb("bridge0", "169.254.3.4/16")], [tb("bridge0", "169.254.9.9/16")]) == (
        "169.254.3.4", "169.254.9.9")
    wifi_only = [Link("en0", "wifi", ("10.7.0.2/30",))]  # same subnet, but not Thunderbolt
    assert shared_thunderbolt(a, wifi_only) is None


def test_bad_input_is_a_host_error() -> None:
    with pytest.raises(HostError, match="unknown link mode 'fast'"):
        plan_ring(triangle(), "fast")
    with pytest.raises(HostError, match="host names repeat"):
        plan_ring([host("h0"), host("h0")])
    with pytest.raises(HostError, match="no hosts"):
        plan_ring([])


def test_launcher_view_of_a_host_counts_fast_ips_as_thunderbolt() -> None:
    from launcher.jobs.remote import ring_host
    from launcher.room.hosts import HostSpec
    from launcher.room.preflight import HostFacts, InterfaceFacts

    def facts(name: str, *interfaces: InterfaceFacts) -> HostFacts:
        return HostFacts(name=name, hostname=name, python_version="3.12.4", python_executable="python3",
                         os_name="Darwin", os_version="14.5", machine="arm64", chip="Apple M2", memory_bytes=2**34,
                         cpu_count=8, disk_path="/", disk_free_bytes=2**40, battery_percent=None, on_ac=None,
                         mlx_version="0.32.4", mlx_error=None, mlx_device="gpu", interfaces=interfaces,
                         probe_seconds=0.1)

    # Two Mac minis joined by a direct 10 GbE cable: the probe calls it Ethernet; hosts.json says it is fast.
    a = ring_host(HostSpec("a", "a.local", fast_ips=("10.6.0.1",)),
                   facts("a", InterfaceFacts("en0", "wifi", ("192.168.1.10/24",)),
                         InterfaceFacts("en8", "ethernet", ("10.6.0.1/30",))), "192.168.1.10")
    b = ring_host(HostSpec("b", "b.local", slots=2),
                   facts("b", InterfaceFacts("en0", "wifi", ("192.168.1.11/24",)),
                         InterfaceFacts("en8", "ethernet", ("10.6.0.2/30",))), "192.168.1.11")
    assert [link.kind for link in a.links] == ["wifi", "thunderbolt"] and b.slots == 2
    assert plan_ring([a, b]).reason == "b has no Thunderbolt link up with an IPv4 address"
    b_fast = ring_host(HostSpec("b", "b.local", slots=2, fast_ips=("10.6.0.2",)),
                        facts("b", InterfaceFacts("en8", "ethernet", ("10.6.0.2/30",))), "192.168.1.11")
    assert plan_ring([a, b_fast]).addresses == ("10.6.0.1", "10.6.0.2", "127.0.0.1")
