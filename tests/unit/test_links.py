"""distributed/links.py: Thunderbolt detection on recorded macOS output and a faked Linux sysfs; the link
probe and the ring measurement over real loopback sockets and a real rendezvous store."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from distributed.errors import LinkError
from distributed.links import (
    Link,
    LinkMeasurement,
    hostfile_address,
    links_from_linux,
    links_from_macos,
    measure_ring,
    parse_ifconfig_status,
    run_probe,
    serve_probe,
    thunderbolt_links,
)
from distributed.probe import parse_ip_json
from distributed.store import StoreClient, new_secret
from distributed.store_server import StoreServer
from tests.support.recorded import MAC_PORTS

pytestmark = pytest.mark.timeout(60)

# A Mac Studio cabled to two others: Thunderbolt Bridge with a manual 10.x address, en2 carrying it.
MAC_BRIDGE_UP = """\
lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
\tinet 127.0.0.1 netmask 0xff000000
\tinet6 ::1 prefixlen 128
\tinet6 fe80::1%lo0 prefixlen 64 scopeid 0x1
\tnd6 options=201<PERFORMNUD,DAD>
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\toptions=6460<TSO4,TSO6,CHANNEL_IO,PARTIAL_CSUM,ZEROINVERT_CSUM>
\tether 3c:22:fb:00:11:22
\tinet6 fe80::1c4b:2e1a:9f3d:6a10%en0 prefixlen 64 secured scopeid 0xb
\tinet 192.168.1.23 netmask 0xffffff00 broadcast 192.168.1.255
\tnd6 options=201<PERFORMNUD,DAD>
\tmedia: autoselect
\tstatus: active
en1: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\toptions=460<TSO4,TSO6,CHANNEL_IO>
\tether 36:aa:bb:cc:dd:01
\tmedia: autoselect <full-duplex>
\tstatus: inactive
en2: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\toptions=460<TSO4,TSO6,CHANNEL_IO>
\tether 36:aa:bb:cc:dd:02
\tmedia: autoselect <full-duplex>
\tstatus: active
bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\toptions=63<RXCSUM,TXCSUM,TSO4,TSO6>
\tether 36:aa:bb:cc:dd:00
\tConfiguration:
\t\tid 0:0:0:0:0:0 priority 0 hellotime 0 fwddelay 0
\t\tmaxage 0 holdcnt 0 proto stp maxaddr 100 timeout 1200
\t\troot id 0:0:0:0:0:0 priority 0 ifcost 0 port 0
\t\tipfilter disabled flags 0x0
\tmember: en1 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 8 priority 0 path cost 0
\tmember: en2 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 9 priority 0 path cost 0
\tinet 10.0.7.1 netmask 0xfffffffc broadcast 10.0.7.3
\tnd6 options=201<PERFORMNUD,DAD>
\tmedia: <unknown type>
\tstatus: active
utun0: flags=8051<UP,POINTOPOINT,RUNNING,MULTICAST> mtu 1380
\tinet6 fe80::5e1d:a3ff:fe01:2b3c%utun0 prefixlen 64 scopeid 0xf
\tnd6 options=201<PERFORMNUD,DAD>
"""

# A MacBook with no cable in: the bridge is UP and has its members but says inactive, no IPv4.
MAC_BRIDGE_DOWN = """\
lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\tinet 127.0.0.1 netmask 0xff000000
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tether a4:83:e7:10:20:30
\tinet 192.168.1.40 netmask 0xffffff00 broadcast 192.168.1.255
\tstatus: active
en1: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\tmedia: autoselect <full-duplex>
\tstatus: inactive
en2: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\tmedia: autoselect <full-duplex>
\tstatus: inactive
bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tConfiguration:
\t\tid 0:0:0:0:0:0 priority 0 hellotime 0 fwddelay 0
\tmember: en1 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 5 priority 0 path cost 0
\tmember: en2 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 6 priority 0 path cost 0
\tmedia: <unknown type>
\tstatus: inactive
"""

# Same bridge, cabled, no manual address: macOS self-assigns 169.254/16.
MAC_BRIDGE_LINK_LOCAL = MAC_BRIDGE_DOWN.replace(
    "\tmedia: <unknown type>\n\tstatus: inactive",
    "\tinet 169.254.81.7 netmask 0xffff0000 broadcast 169.254.255.255\n\tmedia: <unknown type>\n\tstatus: active",
).replace("\tmedia: autoselect <full-duplex>\n\tstatus: inactive\nen2", "\tmedia: autoselect <full-duplex>\n"
          "\tstatus: active\nen2")



def by_name(links: list[Link]) -> dict[str, Link]:
    return {link.name: link for link in links}


# ---- macOS ----------------------------------------------------------------------------------------------


def test_macos_thunderbolt_bridge_up_with_a_manual_address() -> None:
    links = by_name(links_from_macos(MAC_BRIDGE_UP, MAC_PORTS))
    assert links["bridge0"] == Link("bridge0", "thunderbolt", ("10.0.7.1/30",), True, ("en1", "en2"))
    assert links["en0"].kind == "wifi" and links["en0"].addresses == ("192.168.1.23",)
    assert links["lo0"].kind == "loopback"
    assert (links["en1"].kind, links["en1"].up) == ("thunderbolt", False)  # no cable in that port
    assert (links["en2"].kind, links["en2"].up) == ("thunderbolt", True)
    assert links["utun0"].kind == "other" and links["utun0"].ipv4 == ()
    assert [link.name for link in thunderbolt_links(links.values())] == ["bridge0"]
    assert str(links["bridge0"].interfaces[0].network) == "10.0.7.0/30"


def test_macos_thunderbolt_bridge_without_a_cable_is_down() -> None:
    links = by_name(links_from_macos(MAC_BRIDGE_DOWN, MAC_PORTS))
    bridge = links["bridge0"]
    assert bridge.kind == "thunderbolt" and bridge.members == ("en1", "en2")
    assert bridge.up is False and bridge.ipv4 == ()
    assert thunderbolt_links(links.values()) == []


def test_macos_bridge_whose_ports_are_all_inactive_is_down_even_if_it_claims_active() -> None:
    text = MAC_BRIDGE_DOWN.replace("\tmedia: <unknown type>\n\tstatus: inactive",
                                   "\tinet 169.254.3.4 netmask 0xffff0000\n\tstatus: active")
    assert by_name(links_from_macos(text, MAC_PORTS))["bridge0"].up is False


def test_macos_link_local_bridge_is_usable() -> None:
    bridge = by_name(links_from_macos(MAC_BRIDGE_LINK_LOCAL, MAC_PORTS))["bridge0"]
    assert (bridge.kind, bridge.up, bridge.ipv4) == ("thunderbolt", True, ("169.254.81.7/16",))


def test_ifconfig_status_lines() -> None:
    status = parse_ifconfig_status(MAC_BRIDGE_UP)
    assert status == {"en0": "active", "en1": "inactive", "en2": "active", "bridge0": "active"}


# ---- Linux (sysfs faked) --------------------------------------------------------------------------------


def fake_sysfs(root: Path) -> Path:
    """/sys/class/net as the kernel lays it out: device/driver is a symlink into /sys/bus/.../drivers."""
    net = root / "class" / "net"
    drivers = root / "bus"
    for bus, driver in (("thunderbolt", "thunderbolt-net"), ("pci", "igb"), ("pci", "iwlwifi")):
        (drivers / bus / "drivers" / driver).mkdir(parents=True)

    def iface(name: str, operstate: str, driver: tuple[str, str] | None = None, wireless: bool = False) -> None:
        (net / name).mkdir(parents=True)
        (net / name / "operstate").write_text(operstate + "\n")
        if driver:
            (net / name / "device").mkdir()
            (net / name / "device" / "driver").symlink_to(drivers / driver[0] / "drivers" / driver[1])
        if wireless:
            (net / name / "wireless").mkdir()

    iface("lo", "unknown")
    iface("enp3s0", "up", ("pci", "igb"))
    iface("wlp2s0", "up", ("pci", "iwlwifi"), wireless=True)
    iface("tbt-left", "up", ("thunderbolt", "thunderbolt-net"))  # renamed by udev: the driver says Thunderbolt
    iface("thunderbolt1", "lowerlayerdown", ("thunderbolt", "thunderbolt-net"))  # cable out
    iface("thunderbolt2", "down", ("thunderbolt", "thunderbolt-net"))  # no address: only in sysfs
    iface("docker0", "down")
    return net


LINUX_IP = json.dumps([
    {"ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"],
     "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifname": "enp3s0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "addr_info": [{"family": "inet", "local": "192.168.1.50", "prefixlen": 24}]},
    {"ifname": "wlp2s0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "addr_info": [{"family": "inet", "local": "192.168.1.51", "prefixlen": 24}]},
    {"ifname": "tbt-left", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "addr_info": [{"family": "inet", "local": "10.0.9.2", "prefixlen": 30}]},
    {"ifname": "thunderbolt1", "flags": ["NO-CARRIER", "BROADCAST", "MULTICAST", "UP"],
     "addr_info": [{"family": "inet", "local": "10.0.8.1", "prefixlen": 30}]},
    {"ifname": "docker0", "flags": ["NO-CARRIER", "BROADCAST", "MULTICAST"],
     "addr_info": [{"family": "inet", "local": "172.17.0.1", "prefixlen": 16}]},
])


def test_linux_thunderbolt_by_driver_or_name_and_state_from_sysfs(tmp_path: Path) -> None:
    net = fake_sysfs(tmp_path)
    links = by_name(links_from_linux(parse_ip_json(LINUX_IP).values(), net))
    kinds = {name: link.kind for name, link in links.items()}
    assert kinds == {"lo": "loopback", "enp3s0": "ethernet", "wlp2s0": "wifi", "tbt-left": "thunderbolt",
                     "thunderbolt1": "thunderbolt", "thunderbolt2": "thunderbolt", "docker0": "other"}
    assert links["tbt-left"].up and links["tbt-left"].ipv4 == ("10.0.9.2/30",)
    assert links["thunderbolt1"].up is False  # UP but no carrier
    assert links["thunderbolt2"] == Link("thunderbolt2", "thunderbolt", (), False)
    assert links["docker0"].up is False
    assert [link.name for link in thunderbolt_links(links.values())] == ["tbt-left"]


def test_linux_without_sysfs_keeps_names_and_flags(tmp_path: Path) -> None:
    links = by_name(links_from_linux(parse_ip_json(LINUX_IP).values(), tmp_path / "missing"))
    assert links["thunderbolt1"].kind == "thunderbolt"  # by name
    assert links["tbt-left"].kind == "other"  # no driver to ask
    assert links["docker0"].up is False and links["enp3s0"].up is True


def test_link_and_measurement_round_trip_through_json() -> None:
    link = Link("bridge0", "thunderbolt", ("10.0.7.1/30",), True, ("en1",))
    assert Link.from_dict(json.loads(json.dumps(link.to_dict()))) == link
    m = LinkMeasurement(1.25e9, 0.0002, 375_000_000, 0.3)
    assert LinkMeasurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.bandwidth_bits_s == 1e10 and str(m) == "10000 Mbit/s, RTT 0.20 ms"


def test_hostfile_address_is_the_ranks_own_entry(tmp_path: Path) -> None:
    path = tmp_path / "hostfile.json"
    path.write_text(json.dumps([["10.0.3.2:5000"], ["10.0.1.2:5001"], ["127.0.0.1:5002"]]))
    assert [hostfile_address(path, r) for r in range(3)] == ["10.0.3.2", "10.0.1.2", "127.0.0.1"]


# ---- probing over loopback --------------------------------------------------------------------------------


def test_probe_over_loopback_measures_the_stream_and_round_trips() -> None:
    with serve_probe("127.0.0.1") as server:
        m = run_probe("127.0.0.1", server.port, seconds=0.2)
        capped = run_probe("127.0.0.1", server.port, seconds=5.0, max_bytes=3_000_001, pings=3)
    assert 0.1 <= m.seconds < 2.0 and m.bytes >= 1 << 20
    assert m.bandwidth_bytes_s > 50e6  # loopback moves GB/s; a probe this slow measures something else
    assert m.bandwidth_bytes_s <= m.bytes / m.seconds * 1.01  # the first read is excluded, never added
    assert 0 < m.rtt_s < 0.05
    assert capped.bytes == 3_000_001 and capped.seconds < 2.0  # max_bytes ends the stream, not the clock


def test_probe_server_ignores_strangers_and_keeps_serving() -> None:
    with serve_probe("127.0.0.1") as server:
        with socket.create_connection(("127.0.0.1", server.port)) as stranger:
            stranger.sendall(b"GET / HTTP/1.0\r\n\r\n")
            stranger.settimeout(5)
            try:
                answer = stranger.recv(100)
            except ConnectionResetError:  # closed with our request unread: a reset, also no answer
                answer = b""
            assert answer == b""
        assert run_probe("127.0.0.1", server.port, seconds=0.05).bytes > 0


def test_probe_of_a_closed_port_is_a_link_error() -> None:
    with serve_probe("127.0.0.1") as server:
        port = server.port
    with pytest.raises(LinkError, match=rf"cannot reach the link probe at 127.0.0.1:{port}") as info:
        run_probe("127.0.0.1", port, timeout=2)
    assert info.value.hint and "reachable" in info.value.hint


def test_serve_probe_on_an_address_not_ours_is_a_link_error() -> None:
    with pytest.raises(LinkError, match="cannot listen for a link probe on 198.51.100.7"):
        serve_probe("198.51.100.7")  # TEST-NET-2: bind fails locally, nothing is sent


def _ring(world: int, addrs: list[str], **kw: Any) -> tuple[list[Any], float]:
    """measure_ring on `world` threads (one store client each) against a real store; results and wall time."""
    secret = new_secret()
    out: list[Any] = [None] * world
    with StoreServer("127.0.0.1", 0, secret) as store:
        def rank(r: int) -> None:
            with StoreClient("127.0.0.1", store.port, secret) as client:
                try:
                    out[r] = measure_ring(client, r, world, addrs[r], seconds=0.1, timeout=20, **kw)
                except LinkError as exc:
                    out[r] = exc
        threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return out, time.monotonic() - started


@pytest.mark.parametrize("concurrent", [True, False])
def test_measure_ring_gives_every_rank_every_link(concurrent: bool) -> None:
    out, _ = _ring(3, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], concurrent=concurrent)
    for results in out:
        assert isinstance(results, list) and len(results) == 3
        assert all(m.bytes > 0 and m.bandwidth_bytes_s > 0 and m.rtt_s > 0 for m in results)
    assert out[0] == out[1] == out[2]  # one set of numbers, seen by all


def test_measure_ring_fails_on_every_rank_quickly_when_one_cannot_serve() -> None:
    out, wall = _ring(3, ["127.0.0.1", "198.51.100.7", "127.0.0.3"])
    assert all(isinstance(e, LinkError) for e in out), out
    assert all("rank 1" in str(e) and "198.51.100.7" in str(e) for e in out)
    assert wall < 10  # published, not waited out (the timeout is 20 s)


def test_measure_ring_of_one_rank_measures_nothing() -> None:
    assert measure_ring(None, 0, 1, "127.0.0.1") == []  # type: ignore[arg-type]
