"""What `macrun hosts setup-thunderbolt` reads from a host, parsed: interfaces, MACs, bridges, IPv6 neighbours.

A host answers one gathering command (`GATHER`, a POSIX shell script) whose output is split into sections
by `@@macrun:<name>` lines; later, hosts whose cables Thunderbolt UIDs could not map answer a neighbour
probe (`NEIGHBOUR_PROBE` then `ip -j -6 neigh` or `ndp -an`). Everything below is a pure function of that
text, so every macOS and Linux case is a unit test on recorded-format output (tests/unit/test_tbsetup*.py).

Which interfaces are Thunderbolt: on macOS the hardware ports networksetup calls "Thunderbolt N" (en2,
en3, ...; not the bridge); on Linux those bound to the `thunderbolt-net` driver or named `thunderbolt*`
(what the kernel driver and the test lab's veths are called), as in distributed/links.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from distributed import probe
from distributed.links import ifconfig_field, parse_ifconfig_status
from launcher.thunderbolt.rdma import ThunderboltPort, parse_thunderbolt

MARK = "@@macrun:"

# One command per host, any login shell: what the host is, its interfaces and, on a Mac, its cable map.
# `sudo -n true` tells whether sudo would need a password (nothing is run with it here).
GATHER = f"""\
echo "{MARK}uid"; id -u
echo "{MARK}sudo"; if sudo -n true >/dev/null 2>&1; then echo yes; else echo no; fi
echo "{MARK}os"; uname -s
if [ "$(uname -s)" = Darwin ]; then
  echo "{MARK}ifconfig"; /sbin/ifconfig -a
  echo "{MARK}ports"; /usr/sbin/networksetup -listallhardwareports
  echo "{MARK}thunderbolt"; /usr/sbin/system_profiler SPThunderboltDataType -json 2>/dev/null
else
  echo "{MARK}ip"; ip -j addr show
  echo "{MARK}drivers"
  for d in /sys/class/net/*; do echo "${{d##*/}} $(readlink "$d/device/driver" 2>/dev/null)"; done
fi
"""

# Run by the host's Python (`python - IFACE...` with this on stdin): an ICMPv6 echo to all nodes (ff02::1) out
# of each interface. Each peer that answers first asks for our MAC (neighbour solicitation), which puts the
# peer and its MAC into our neighbour table; that table, not the answers, is read afterwards. Unprivileged
# ICMP sockets (macOS) first, raw ones (root on Linux) second; no `ping` binary needed.
NEIGHBOUR_PROBE = """\
import os, select, socket, struct, sys, time
socks = {}
for name in sys.argv[1:]:
    try:
        index = socket.if_nametoindex(name)
    except OSError:
        continue
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            s = socket.socket(socket.AF_INET6, kind, socket.IPPROTO_ICMPV6)
            break
        except OSError:
            s = None
    if s is None:
        print("no ICMPv6 socket for", name)
        continue
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        socks[s] = index
    except OSError as exc:
        print("cannot probe", name, exc)
# Asked again every 0.25 s until each interface has an answer: an interface that has just come up can
# drop the first ones (seen in the lab: a freshly enabled veth answered from the second second on).
echo = struct.pack("!BBHHH", 128, 0, 0, os.getpid() & 0xFFFF, 1) + b"macrun"
start = time.monotonic()
deadline, ask = start + 3.0, start
while socks and time.monotonic() < deadline:
    if time.monotonic() >= ask:
        for s, index in socks.items():
            try:
                s.sendto(echo, ("ff02::1", 0, 0, index))
            except OSError:
                pass
        ask += 0.25
    ready, _, _ = select.select(list(socks), [], [], max(0.0, min(ask, deadline) - time.monotonic()))
    for s in ready:
        if s.recv(2048)[:1] == b"\\x81":  # an echo reply (IPv6 sockets never see the IP header)
            del socks[s]
"""


@dataclass(frozen=True, slots=True)
class NetIface:
    """One network interface of a host, as setup-thunderbolt needs it."""

    name: str  # "en2", "thunderbolt0", "bridge0"
    mac: str | None = None  # normalised "aa:bb:cc:0d:0e:0f"; None for interfaces without one
    up: bool = True  # administratively up
    ipv4: tuple[str, ...] = ()  # "a.b.c.d/len"
    thunderbolt: bool = False  # a Thunderbolt port (never the bridge over them)
    master: str | None = None  # Linux: the bridge it is enslaved to
    members: tuple[str, ...] = ()  # a bridge's member ports (macOS `member:` lines)


@dataclass(frozen=True, slots=True)
class HostNet:
    """One host's network as gathered: its OS, interfaces, Thunderbolt ports (macOS) and who may run sudo."""

    os: str  # "Darwin" | "Linux"
    ifaces: tuple[NetIface, ...]
    ports: tuple[ThunderboltPort, ...] = ()  # macOS: system_profiler's cable map (UIDs), with devices
    root: bool = False  # the SSH user is root: no sudo
    sudo_without_password: bool = False  # `sudo -n true` worked
    neighbours: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # iface -> neighbour MACs
    notes: tuple[str, ...] = ()

    def iface(self, name: str) -> NetIface | None:
        return next((i for i in self.ifaces if i.name == name), None)

    @property
    def thunderbolt(self) -> tuple[NetIface, ...]:
        return tuple(i for i in self.ifaces if i.thunderbolt)

    def bridges_of(self, iface: str) -> tuple[str, ...]:
        """The bridges `iface` is a member of (macOS member lines, or its Linux master)."""
        found = [i.name for i in self.ifaces if iface in i.members]
        own = self.iface(iface)
        if own is not None and own.master and own.master not in found:
            found.append(own.master)
        return tuple(found)


def normalise_mac(text: str) -> str | None:
    """"36:aa:b:c:d:2" (how ndp and arp print it) -> "36:aa:0b:0c:0d:02"; None if it is not a MAC."""
    parts = text.strip().lower().split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-f]{1,2}", p) for p in parts):
        return None
    mac = ":".join(p.zfill(2) for p in parts)
    return None if mac == "00:00:00:00:00:00" else mac


def split_sections(text: str) -> dict[str, str]:
    """GATHER's output as {section: text}."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(MARK):
            current = sections.setdefault(line[len(MARK):].strip(), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) + ("\n" if lines else "") for name, lines in sections.items()}


def ifaces_from_ip_json(ip_json: str, drivers_text: str = "") -> list[NetIface]:
    """Linux `ip -j addr show` (plus "name driver" lines from sysfs) -> interfaces, Thunderbolt marked."""
    drivers = {words[0]: words[1].rstrip("/").rsplit("/", 1)[-1] for line in drivers_text.splitlines()
               if len(words := line.split(None, 1)) == 2}
    try:
        entries = json.loads(ip_json or "[]")
    except ValueError:
        return []
    found = []
    for entry in entries if isinstance(entries, list) else ():
        name = entry.get("ifname") if isinstance(entry, dict) else None
        if not name:
            continue
        ipv4 = tuple(f"{a['local']}/{a.get('prefixlen', 32)}" for a in entry.get("addr_info") or ()
                     if a.get("family") == "inet" and a.get("local"))
        is_tb = name.startswith("thunderbolt") or drivers.get(name, "") == "thunderbolt-net"
        mac = normalise_mac(str(entry.get("address") or "")) if entry.get("link_type") == "ether" else None
        found.append(NetIface(name, mac, "UP" in (entry.get("flags") or ()), ipv4, is_tb,
                              master=str(entry["master"]) if entry.get("master") else None))
    return found


def ifaces_from_ifconfig(ifconfig_text: str, ports_text: str) -> list[NetIface]:
    """macOS `ifconfig -a` and `networksetup -listallhardwareports` -> interfaces, Thunderbolt ports marked."""
    parsed = probe.parse_ifconfig(ifconfig_text)
    ports = probe.parse_hardware_ports(ports_text)
    macs = {name: mac for name, text in ifconfig_field(ifconfig_text, "ether").items()
            if (mac := normalise_mac(text))}
    return [NetIface(name, macs.get(name), bool(i["up"]), tuple(i["ipv4"]),
                     re.fullmatch(r"Thunderbolt \d+", ports.get(name, "")) is not None,
                     members=tuple(i["members"])) for name, i in parsed.items()]


def host_net(gathered: str) -> HostNet:
    """A host's HostNet from GATHER's output (neighbours come later, from `with_neighbours`)."""
    s = split_sections(gathered)
    system = s.get("os", "").strip() or "Linux"
    root = s.get("uid", "").strip() == "0"
    sudo_ok = s.get("sudo", "").strip() == "yes"
    if system == "Darwin":
        ifaces = ifaces_from_ifconfig(s.get("ifconfig", ""), s.get("ports", ""))
        hardware = probe.parse_hardware_ports(s.get("ports", ""))
        ports, notes = parse_thunderbolt(s.get("thunderbolt", ""), hardware)
        status = parse_ifconfig_status(s.get("ifconfig", ""))
        ifaces = [i if status.get(i.name, "active") == "active" or not i.thunderbolt
                  else NetIface(i.name, i.mac, False, i.ipv4, i.thunderbolt, i.master, i.members) for i in ifaces]
        return HostNet("Darwin", tuple(ifaces), tuple(ports), root, sudo_ok, notes=tuple(notes))
    return HostNet(system, tuple(ifaces_from_ip_json(s.get("ip", ""), s.get("drivers", ""))), (), root, sudo_ok)


def neighbours_from_ip_json(text: str) -> dict[str, tuple[str, ...]]:
    """Linux `ip -j -6 neigh show` -> {iface: neighbour MACs}; entries without a MAC (FAILED) are skipped."""
    try:
        entries = json.loads(text or "[]")
    except ValueError:
        return {}
    found: dict[str, list[str]] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        mac = normalise_mac(str(entry.get("lladdr") or ""))
        if mac and entry.get("dev"):
            found.setdefault(str(entry["dev"]), [])
            if mac not in found[str(entry["dev"])]:
                found[str(entry["dev"])].append(mac)
    return {k: tuple(v) for k, v in found.items()}


def neighbours_from_ndp(text: str) -> dict[str, tuple[str, ...]]:
    """macOS `ndp -an` -> {iface: neighbour MACs}; "(incomplete)" rows are skipped, the host's own rows too
    (ndp lists the host's own addresses as permanent entries: the caller drops its own MACs)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[0] == "Neighbor":
            continue
        mac, dev = normalise_mac(words[1]), words[2]
        if mac:
            found.setdefault(dev, [])
            if mac not in found[dev]:
                found[dev].append(mac)
    return {k: tuple(v) for k, v in found.items()}


def neighbours(text: str) -> dict[str, tuple[str, ...]]:
    """The neighbour table after the probe: JSON from `ip -j -6 neigh`, or `ndp -an`'s table."""
    return neighbours_from_ip_json(text) if text.lstrip().startswith("[") else neighbours_from_ndp(text)


__all__ = ["GATHER", "MARK", "NEIGHBOUR_PROBE", "HostNet", "NetIface", "host_net", "ifaces_from_ifconfig",
           "ifaces_from_ip_json", "neighbours", "neighbours_from_ip_json", "neighbours_from_ndp", "normalise_mac",
           "split_sections"]
