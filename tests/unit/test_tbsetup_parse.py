"""setup-thunderbolt's parsers on recorded-format output: Linux `ip -j` (captured in the lab), macOS `ifconfig`,
`ndp -an` and networksetup (written in the formats macOS prints; not captured on a Mac)."""

from __future__ import annotations

import json

from launcher.thunderbolt.tbsetup_parse import (
    MARK,
    host_net,
    ifaces_from_ifconfig,
    ifaces_from_ip_json,
    neighbours,
    neighbours_from_ip_json,
    neighbours_from_ndp,
    normalise_mac,
    split_sections,
)
from tests.support.recorded import MAC_PORTS
from tests.support.recorded_rdma import Room

# `ip -j addr show` in a neutral lab host (captured), plus a real Thunderbolt NIC renamed by udev and an
# interface enslaved to a bridge (edited in, same format).
LINUX_IP = json.dumps([
    {"ifindex": 1, "ifname": "lo", "flags": ["LOOPBACK", "UP", "LOWER_UP"], "link_type": "loopback",
     "address": "00:00:00:00:00:00", "addr_info": [{"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
    {"ifindex": 2, "link_index": 669, "ifname": "wifi0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "operstate": "UP", "link_type": "ether", "address": "5e:1e:b0:5f:7e:ff",
     "addr_info": [{"family": "inet", "local": "10.232.0.10", "prefixlen": 24, "scope": "global"}]},
    {"ifindex": 3, "link_index": 3, "ifname": "thunderbolt0", "flags": ["BROADCAST", "MULTICAST", "UP", "LOWER_UP"],
     "operstate": "UP", "link_type": "ether", "address": "0a:bd:ca:fa:47:49",
     "addr_info": [{"family": "inet6", "local": "fe80::8bd:caff:fefa:4749", "prefixlen": 64, "scope": "link"}]},
    {"ifindex": 4, "ifname": "tbt-left", "flags": ["BROADCAST", "MULTICAST"], "operstate": "DOWN",
     "link_type": "ether", "address": "02:5A:0B:00:00:01", "master": "br0", "addr_info": []},
])
LINUX_DRIVERS = "lo \nwifi0 \nthunderbolt0 \ntbt-left ../../../../bus/thunderbolt/drivers/thunderbolt-net\n"

# `ip -j -6 neigh show` after the probe (captured in the lab), plus a FAILED entry (no lladdr).
LINUX_NEIGH = ('[{"dst":"fe80::862:1eff:fe1a:61d9","dev":"thunderbolt0","lladdr":"0a:62:1e:1a:61:d9",'
               '"state":["DELAY"]},{"dst":"fe80::1","dev":"wifi0","state":["FAILED"]}]')

# macOS `ifconfig -a`: two Thunderbolt ports in the Thunderbolt Bridge, a third one out of it with an
# address macrun set, the bridge with its self-assigned address.
MAC_IFCONFIG = """\
lo0: flags=8049<UP,LOOPBACK,RUNNING,MULTICAST> mtu 16384
\toptions=1203<RXCSUM,TXCSUM,TXSTATUS,SW_TIMESTAMP>
\tinet 127.0.0.1 netmask 0xff000000
\tinet6 ::1 prefixlen 128
\tinet6 fe80::1%lo0 prefixlen 64 scopeid 0x1
\tnd6 options=201<PERFORMNUD,DAD>
en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\toptions=6460<TSO4,TSO6,CHANNEL_IO,PARTIAL_CSUM,ZEROINVERT_CSUM>
\tether 3c:22:fb:00:11:22
\tinet6 fe80::1c8a:3f2b:4d5e:6f70%en0 prefixlen 64 secured scopeid 0xb
\tinet 192.168.1.20 netmask 0xffffff00 broadcast 192.168.1.255
\tnd6 options=201<PERFORMNUD,DAD>
\tmedia: autoselect
\tstatus: active
en1: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\toptions=460<TSO4,TSO6,CHANNEL_IO>
\tether 36:aa:bb:cc:dd:01
\tmedia: autoselect <full-duplex>
\tstatus: active
en2: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500
\toptions=460<TSO4,TSO6,CHANNEL_IO>
\tether 36:aa:bb:cc:dd:02
\tinet6 fe80::34aa:bbff:fecc:dd02%en2 prefixlen 64 scopeid 0x9
\tinet 10.100.0.1 netmask 0xfffffffc broadcast 10.100.0.3
\tmedia: autoselect <full-duplex>
\tstatus: inactive
bridge0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\toptions=63<RXCSUM,TXCSUM,TSO4,TSO6>
\tether 36:aa:bb:cc:dd:00
\tinet 169.254.13.7 netmask 0xffff0000 broadcast 169.254.255.255
\tConfiguration:
\t\tid 0:0:0:0:0:0 priority 0 hellotime 0 fwddelay 0
\t\tmaxage 0 holdcnt 0 proto stp maxaddr 100 timeout 1200
\t\troot id 0:0:0:0:0:0 priority 0 ifcost 0 port 0
\t\tipfilter disabled flags 0x0
\tmember: en1 flags=3<LEARNING,DISCOVER>
\t        ifmaxaddr 0 port 8 priority 0 path cost 0
\tnd6 options=201<PERFORMNUD,DAD>
\tmedia: <unknown type>
\tstatus: active
"""

# macOS `ndp -an`: its own addresses (permanent, own MAC), a peer on en1 (macOS drops leading zeros in
# MACs), an unanswered one.
MAC_NDP = """\
Neighbor                             Linklayer Address  Netif Expire    St Flgs Prbs
fe80::1%lo0                          (incomplete)         lo0 permanent R
fe80::34aa:bbff:fecc:dd01%en1        36:aa:bb:cc:dd:1     en1 permanent R
fe80::4a1:b2ff:fe0c:d03%en1          6:a1:b2:c:d:3        en1 23h59m58s S
fe80::9%en2                          (incomplete)         en2 expired   N
"""


def test_macs_are_normalised_or_refused() -> None:
    assert normalise_mac("6:A1:b2:c:D:3") == "06:a1:b2:0c:0d:03"
    assert normalise_mac("(incomplete)") is None and normalise_mac("00:00:00:00:00:00") is None
    assert normalise_mac("1:2:3") is None and normalise_mac("zz:00:00:00:00:01") is None


def test_gathered_output_splits_into_sections() -> None:
    text = f"{MARK}uid\n0\n{MARK}os\nLinux\n{MARK}empty\n"
    assert split_sections(text) == {"uid": "0\n", "os": "Linux\n", "empty": ""}
    assert split_sections("junk before any mark\n") == {}


def test_linux_interfaces_from_ip_json_mark_thunderbolt_by_name_or_driver() -> None:
    found = {i.name: i for i in ifaces_from_ip_json(LINUX_IP, LINUX_DRIVERS)}
    assert found["lo"].mac is None and not found["lo"].thunderbolt
    assert found["wifi0"].ipv4 == ("10.232.0.10/24",) and not found["wifi0"].thunderbolt
    tb0 = found["thunderbolt0"]
    assert (tb0.thunderbolt, tb0.up, tb0.ipv4, tb0.mac) == (True, True, (), "0a:bd:ca:fa:47:49")
    left = found["tbt-left"]
    assert (left.thunderbolt, left.up, left.master, left.mac) == (True, False, "br0", "02:5a:0b:00:00:01")
    assert ifaces_from_ip_json("not json") == [] and ifaces_from_ip_json('{"a": 1}') == []


def test_linux_host_from_the_gathering_command() -> None:
    text = (f"{MARK}uid\n1000\n{MARK}sudo\nyes\n{MARK}os\nLinux\n{MARK}ip\n{LINUX_IP}\n"
            f"{MARK}drivers\n{LINUX_DRIVERS}")
    net = host_net(text)
    assert (net.os, net.root, net.sudo_without_password) == ("Linux", False, True)
    assert [i.name for i in net.thunderbolt] == ["thunderbolt0", "tbt-left"]
    assert net.bridges_of("tbt-left") == ("br0",) and net.bridges_of("thunderbolt0") == ()


def test_neighbour_tables_linux_and_macos() -> None:
    assert neighbours_from_ip_json(LINUX_NEIGH) == {"thunderbolt0": ("0a:62:1e:1a:61:d9",)}
    assert neighbours(LINUX_NEIGH) == neighbours_from_ip_json(LINUX_NEIGH)
    assert neighbours_from_ip_json("") == {} and neighbours_from_ip_json("[1, null]") == {}
    assert neighbours_from_ndp(MAC_NDP) == {"en1": ("36:aa:bb:cc:dd:01", "06:a1:b2:0c:0d:03")}
    assert neighbours(MAC_NDP) == neighbours_from_ndp(MAC_NDP)


def test_macos_interfaces_from_ifconfig_and_networksetup() -> None:
    found = {i.name: i for i in ifaces_from_ifconfig(MAC_IFCONFIG, MAC_PORTS)}
    assert [n for n, i in found.items() if i.thunderbolt] == ["en1", "en2"]  # "Thunderbolt N", not the bridge
    assert found["bridge0"].members == ("en1",) and found["bridge0"].ipv4 == ("169.254.13.7/16",)
    assert found["en2"].ipv4 == ("10.100.0.1/30",) and found["en2"].mac == "36:aa:bb:cc:dd:02"
    assert found["en0"].mac == "3c:22:fb:00:11:22" and found["lo0"].mac is None


def test_macos_host_has_its_cable_map_and_inactive_ports_are_down() -> None:
    room = Room.of("a", "b").cable("a", "b")
    mac = room.macs["a"]
    text = (f"{MARK}uid\n501\n{MARK}sudo\nno\n{MARK}os\nDarwin\n{MARK}ifconfig\n{MAC_IFCONFIG}"
            f"{MARK}ports\n{mac.hardware_ports()}\n{MARK}thunderbolt\n{mac.thunderbolt(room)}\n")
    net = host_net(text)
    assert (net.os, net.root, net.sudo_without_password) == ("Darwin", False, False)
    assert [p.iface for p in net.ports if p.peer_uid] == ["en2"]  # receptacle 1 is en2 on this Mac
    en2 = net.iface("en2")
    assert en2 is not None and en2.thunderbolt and not en2.up  # `status: inactive`
    assert net.bridges_of("en1") == ("bridge0",)
