"""A host's network links (which of them are Thunderbolt) and a quick probe of a link's bandwidth and latency.

Listing reuses the parsers of `distributed.probe` (the launcher's preflight runs that same script), adding
what only a rank needs: whether a link is really up (macOS `status:` lines; Linux `operstate`) and
interfaces that exist but have no IPv4 address yet.

Thunderbolt is recognised
- on macOS by the hardware port: `networksetup -listallhardwareports` names "Thunderbolt Bridge"
  (bridge0, which carries the address) and "Thunderbolt N" (its member ports en1, en2, ...);
- on Linux by the driver: `/sys/class/net/IF/device/driver` -> `thunderbolt-net`, or the name
  `thunderbolt*` (what the kernel driver calls them, and what the test lab's veths are called).

Probing (`serve_probe` on one rank, `run_probe` on its neighbour, `measure_ring` for a whole ring through
the rendezvous store) uses plain TCP: a few one-byte ping-pongs for the round-trip time, then a stream for
about `seconds`. The receiver times the stream from its first to its last byte, so data still queued in
the sender's socket buffer when the sender stops cannot inflate the rate.

Standard library only: it runs on every host.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import platform
import re
import shutil
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import probe
from distributed.errors import LinkError

if TYPE_CHECKING:
    from distributed.store import StoreClient

KINDS = ("thunderbolt", "ethernet", "wifi", "loopback", "other")
SYSFS_NET = Path("/sys/class/net")
COMMAND_TIMEOUT_S = 5.0

_MAGIC = b"MRLP"  # a probe connection starts with this; anything else is closed unanswered
_PING, _STREAM = b"p", b"s"
_REPLY = struct.Struct(">QQd")  # total bytes, bytes timed (all but the first read), seconds
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Link:
    """One network interface of this host, as the ring planner needs it."""

    name: str  # "bridge0", "en0", "thunderbolt0"
    kind: str  # one of KINDS
    ipv4: tuple[str, ...] = ()  # "a.b.c.d/len"
    up: bool = True  # administratively up and, where the OS says so, with a carrier (cable, peer)
    members: tuple[str, ...] = ()  # a bridge's ports (macOS Thunderbolt Bridge: en1, en2, ...)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The IPv4 addresses without prefix length."""
        return tuple(a.split("/", 1)[0] for a in self.ipv4)

    @property
    def interfaces(self) -> tuple[ipaddress.IPv4Interface, ...]:
        """The addresses with their subnets (`.network` is the subnet)."""
        return tuple(ipaddress.IPv4Interface(a) for a in self.ipv4)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists for tuples); `from_dict` reads it back."""
        return {"name": self.name, "kind": self.kind, "ipv4": list(self.ipv4), "up": self.up,
                "members": list(self.members)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Link:
        """From `to_dict`'s form or one interface of the probe's JSON (same keys)."""
        return cls(name=str(data["name"]), kind=str(data.get("kind", "other")),
                   ipv4=tuple(str(a) for a in data.get("ipv4", ())), up=bool(data.get("up", True)),
                   members=tuple(str(m) for m in data.get("members", ())))


# ---- listing (pure parts first) ----------------------------------------------------------------------


def ifconfig_field(text: str, name: str) -> dict[str, str]:
    """macOS `ifconfig`: {interface: the first word after `name`} from each interface's indented `name` line
    (e.g. "status" -> "active", "ether" -> the MAC address)."""
    found: dict[str, str] = {}
    current = None
    pattern = re.compile(rf"^\s+{re.escape(name)}:? (\S+)")
    for line in text.splitlines():
        head = re.match(r"^([A-Za-z0-9_.\-]+): flags=", line)
        if head:
            current = head.group(1)
            continue
        value = pattern.match(line)
        if value and current is not None and current not in found:
            found[current] = value.group(1)
    return found


def parse_ifconfig_status(text: str) -> dict[str, str]:
    """macOS `ifconfig`: {interface: "active" | "inactive"} from each interface's `status:` line."""
    return ifconfig_field(text, "status")


def links_from_macos(ifconfig_text: str, hardware_ports_text: str) -> list[Link]:
    """Links from macOS `ifconfig` and `networksetup -listallhardwareports` output.

    A link is up when its flags say UP and its `status:` line (if any) says active: a Thunderbolt Bridge
    without a cable or peer stays UP but reports `status: inactive`. A bridge all of whose member ports
    are inactive is down even if the bridge itself claims otherwise.
    """
    found = probe.parse_ifconfig(ifconfig_text)
    probe.classify_macos(found, probe.parse_hardware_ports(hardware_ports_text))
    status = parse_ifconfig_status(ifconfig_text)
    links = []
    for name, iface in found.items():
        up = bool(iface["up"]) and status.get(name, "active") == "active"
        members = iface["members"]
        if members and all(status.get(m) == "inactive" for m in members):
            up = False
        links.append(Link(name, iface["kind"], tuple(iface["ipv4"]), up, tuple(members)))
    return sorted(links, key=lambda link: link.name)


def links_from_linux(interfaces: Iterable[Mapping[str, Any]], sysfs: Path = SYSFS_NET) -> list[Link]:
    """Classify Linux interfaces (the probe's dicts, e.g. from `probe.parse_ip_json`) by what sysfs says.

    Kind: loopback stays; bound to `thunderbolt-net` or named `thunderbolt*` is Thunderbolt; a `wireless`
    or `phy80211` entry is Wi-Fi; any other driver is Ethernet; no driver (virtual) is other.
    Interfaces present in sysfs but absent from `interfaces` (no IPv4 address) are listed too, so that
    "Thunderbolt cable in, no address configured" is visible. `operstate` "down" or "lowerlayerdown"
    (no carrier) marks a link down.
    """
    by_name = {str(i["name"]): dict(i) for i in interfaces}
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(sysfs)):
            if entry not in by_name and (sysfs / entry).is_dir():
                by_name[entry] = {"name": entry, "kind": "loopback" if entry == "lo" else "other", "ipv4": [],
                                  "members": [], "up": _read(sysfs / entry / "operstate") != "down"}
    links = []
    for name, iface in by_name.items():
        kind = str(iface.get("kind", "other"))
        if kind != "loopback":
            driver = ""
            with contextlib.suppress(OSError):
                driver = os.path.basename(os.readlink(sysfs / name / "device" / "driver"))
            if driver == "thunderbolt-net" or name.startswith("thunderbolt"):
                kind = "thunderbolt"
            elif (sysfs / name / "wireless").exists() or (sysfs / name / "phy80211").exists():
                kind = "wifi"
            elif driver:
                kind = "ethernet"
            else:
                kind = "other"
        up = bool(iface.get("up", True)) and _read(sysfs / name / "operstate") not in ("down", "lowerlayerdown")
        links.append(Link(name, kind, tuple(iface.get("ipv4", ())), up, tuple(iface.get("members", ()))))
    return sorted(links, key=lambda link: link.name)


def list_links(system: str | None = None) -> list[Link]:
    """This host's network interfaces with their kind, IPv4 addresses and state, sorted by name."""
    system = system or platform.system()
    if system == "Darwin":
        return links_from_macos(_output(["ifconfig"]), _output(["networksetup", "-listallhardwareports"]))
    interfaces: list[Mapping[str, Any]] = []
    if shutil.which("ip"):
        with contextlib.suppress(ValueError):
            interfaces = list(probe.parse_ip_json(_output(["ip", "-j", "-4", "addr"])).values())
    if not interfaces:  # no `ip` (minimal images): the probe's ioctl fallback
        interfaces = probe.collect_interfaces(system)
    return links_from_linux(interfaces)


def thunderbolt_links(links: Iterable[Link]) -> list[Link]:
    """The Thunderbolt links that can carry a ring: up and with an IPv4 address."""
    return [link for link in links if link.kind == "thunderbolt" and link.up and link.ipv4]


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.decode("utf-8", "replace")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


# ---- probing -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkMeasurement:
    """What one probe of a link measured, sender to receiver."""

    bandwidth_bytes_s: float  # bytes per second at the receiver
    rtt_s: float  # median round trip of a one-byte ping-pong
    bytes: int  # bytes streamed
    seconds: float  # how long the receiver took to get them (first to last byte)

    @property
    def bandwidth_bits_s(self) -> float:
        return self.bandwidth_bytes_s * 8

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinkMeasurement:
        return cls(float(data["bandwidth_bytes_s"]), float(data["rtt_s"]), int(data["bytes"]),
                   float(data["seconds"]))

    def __str__(self) -> str:
        return f"{self.bandwidth_bits_s / 1e6:.0f} Mbit/s, RTT {self.rtt_s * 1e3:.2f} ms"


class ProbeServer:
    """The receiving side of a link probe: accepts probes on `bind_ip` until closed.

    Each connection gets its own thread, so several neighbours may probe it at once.
    """

    def __init__(self, bind_ip: str, port: int = 0, *, timeout: float = 30.0) -> None:
        self.bind_ip, self.timeout = bind_ip, timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._listener.bind((bind_ip, port))
        except OSError as exc:
            self._listener.close()
            raise LinkError(f"cannot listen for a link probe on {bind_ip}:{port} ({exc.strerror or exc})",
                            hint=f"check that {bind_ip} is an address of this host and the port is free"
                            ) from None
        self._listener.listen(16)
        # accept() wakes up now and then to see `close()`: closing a socket another thread is blocked in
        # accept() on does not wake it on macOS.
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"probe-server-{self.port}", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if _recv_exact(conn, len(_MAGIC)) != _MAGIC:
                    return
                while op := conn.recv(1):
                    if op == _PING:
                        conn.sendall(_PING)
                    elif op == _STREAM:
                        conn.sendall(_REPLY.pack(*_receive_stream(conn)))
                        return
                    else:
                        return
            except OSError:
                return  # the prober went away or stalled: its side reports the failure

    def close(self) -> None:
        """Stop accepting (probes in progress finish on their own threads)."""
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_probe(bind_ip: str, port: int = 0, *, timeout: float = 30.0) -> ProbeServer:
    """Start answering link probes on `bind_ip` (port 0: any free port; see `.port`); close it when done."""
    return ProbeServer(bind_ip, port, timeout=timeout)


def run_probe(peer_ip: str, port: int, *, seconds: float = 0.3, max_bytes: int | None = None, pings: int = 12,
              timeout: float = 10.0, bind_ip: str | None = None) -> LinkMeasurement:
    """Probe the link to a `serve_probe` at `peer_ip:port`: RTT from `pings` ping-pongs, then stream for
    `seconds` (or until `max_bytes`) and take the receiver's rate.

    `bind_ip` pins the local address (and so the interface) the probe leaves from. Raises LinkError when
    the peer cannot be reached or stops answering within `timeout` seconds.
    """
    where = f"{peer_ip}:{port}"
    try:
        sock = socket.create_connection((peer_ip, port), timeout=timeout,
                                        source_address=(bind_ip, 0) if bind_ip else None)
    except OSError as exc:
        raise LinkError(f"cannot reach the link probe at {where} ({exc.strerror or type(exc).__name__})",
                        hint=f"check that {peer_ip} is reachable from this host (cable, address, firewall)"
                        ) from None
    with sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.sendall(_MAGIC)
            rtts = []
            for _ in range(max(pings, 1) + 2):  # the first two warm the path (ARP, slow start): not counted
                started = time.perf_counter()
                sock.sendall(_PING)
                if _recv_exact(sock, 1) != _PING:
                    raise LinkError(f"the link probe at {where} answered garbage")
                rtts.append(time.perf_counter() - started)
            sock.sendall(_STREAM)
            chunk = memoryview(bytes(_CHUNK))
            limit = max_bytes if max_bytes is not None else float("inf")
            sent, started = 0, time.perf_counter()
            end = started + seconds
            while time.perf_counter() < end and sent < limit:
                part = chunk[:int(min(_CHUNK, limit - sent))]
                sock.sendall(part)
                sent += len(part)
            sock.shutdown(socket.SHUT_WR)
            total, timed, elapsed = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
            wall = time.perf_counter() - started
        except OSError as exc:
            raise LinkError(f"the link probe to {where} broke off ({exc.strerror or type(exc).__name__})",
                            hint="the peer stopped or the link dropped; check the cable and run again") from None
    # The receiver's clock is the honest one; a stream that fit in one read has no interval to time.
    rate = timed / elapsed if elapsed > 0 and timed > 0 else total / max(wall, 1e-9)
    return LinkMeasurement(rate, statistics.median(rtts[2:]), int(total), float(elapsed if timed else wall))


def _receive_stream(conn: socket.socket) -> tuple[int, int, float]:
    """Read until the sender shuts its side; time from the first read to the last."""
    buf = bytearray(_CHUNK)
    total = timed = 0
    first = last = 0.0
    while n := conn.recv_into(buf):
        now = time.perf_counter()
        if total == 0:
            first = now  # the clock starts at the first bytes, which are therefore not counted
        else:
            timed += n
        total += n
        last = now
    return total, timed, last - first


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            raise ConnectionResetError("peer closed the connection")
        data += part
    return data


# ---- a whole ring, through the rendezvous store --------------------------------------------------------


def hostfile_address(hostfile: str | Path, rank: int) -> str:
    """Rank `rank`'s own address in an MLX ring hostfile: the one its left neighbour connects to."""
    entries = json.loads(Path(hostfile).read_text())
    return str(entries[rank][0]).rsplit(":", 1)[0]


def measure_ring(client: StoreClient, rank: int, world: int, my_addr: str, *, seconds: float = 0.3,
                 concurrent: bool = True, tag: str = "links", timeout: float = 60.0) -> list[LinkMeasurement]:
    """Every rank measures the link to its right neighbour; all ranks get all results, indexed by rank.

    `my_addr` is this rank's own ring address (its MLX hostfile entry, see `hostfile_address`): the
    left neighbour probes it, so the probe takes the path the ring will take. `concurrent` measures
    every link at once, as a ring collective loads them (on a shared medium such as Wi-Fi the links then
    split its capacity); otherwise ranks take turns and each link is measured alone. `tag` names the
    store keys; use a fresh one for each measurement in a run. Raises LinkError naming the first rank
    whose probe failed.
    """
    if world < 2:
        return []
    right = (rank + 1) % world
    server: ProbeServer | None = None
    result: dict[str, Any] = {}
    try:
        server = serve_probe(my_addr, timeout=timeout)
        client.set_json(f"{tag}/server/{rank}", {"addr": my_addr, "port": server.port})
    except LinkError as exc:  # published, so every rank fails now rather than waits out its timeout
        result = {"error": f"rank {rank}: {exc}"}
        client.set_json(f"{tag}/server/{rank}", result)
    try:
        peer = client.get_json(f"{tag}/server/{right}", timeout)
        if "error" in peer and not result:
            result = {"error": f"rank {rank} has nothing to probe: {peer['error']}"}
        for turn in range(1 if concurrent else world):
            if not result and (concurrent or turn == rank):
                try:
                    result = run_probe(peer["addr"], int(peer["port"]), seconds=seconds, timeout=timeout).to_dict()
                except LinkError as exc:
                    result = {"error": f"rank {rank} -> rank {right} ({peer['addr']}): {exc}"}
            if not concurrent:
                client.barrier(f"{tag}/turn/{turn}", world, timeout)
        client.set_json(f"{tag}/result/{rank}", result)
        # Reading every result also keeps this rank's server open until its left neighbour is done.
        results = [client.get_json(f"{tag}/result/{r}", timeout) for r in range(world)]
    finally:
        if server is not None:
            server.close()
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise LinkError(f"link probe failed: {failed[0]}",
                        hint="check the cables and addresses between those hosts")
    return [LinkMeasurement.from_dict(r) for r in results]


__all__ = ["KINDS", "Link", "LinkMeasurement", "ProbeServer", "hostfile_address", "links_from_linux",
           "links_from_macos", "list_links", "measure_ring", "parse_ifconfig_status", "run_probe", "serve_probe",
           "thunderbolt_links"]
