"""Find Macs on the local network over mDNS and merge them with the hosts file into one list of candidates.

A Mac with Remote Login on announces `_ssh._tcp.local.`; every Mac also announces `_device-info._tcp.local.`
with its model identifier ("MacBookPro18,3") in the TXT record `model`. Both use the computer's name as the
instance name, which is how the two are paired.

    found = browse(3.0)                                   # all IPv4 interfaces
    found = browse(2.0, interfaces=["10.231.0.1"])        # one address only (the lab)
    candidates = merge_hosts(load_hosts("hosts.json"), found)

`MACRUN_MDNS_INTERFACES` (comma-separated IPv4 addresses) restricts browsing to those addresses: binding
zeroconf to one address is what makes mDNS work across network namespaces, and keeps it off every other
interface.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from distributed.errors import ConfigError, HostError, HostsError
from launcher.room.hosts import HostSpec, parse_hosts

SSH_SERVICE = "_ssh._tcp.local."
DEVICE_INFO_SERVICE = "_device-info._tcp.local."
INTERFACES_ENV = "MACRUN_MDNS_INTERFACES"
MIN_RESOLVE_MS = 300  # a service seen at the very end still gets this long to answer its SRV/A query

SOURCE_FILE = "hosts.json"
SOURCE_MDNS = "mDNS"
SOURCE_BOTH = "both"
SOURCE_ADDED = "added"

_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class DiscoveredHost:
    """A machine that announced SSH over mDNS."""

    name: str  # a valid hosts-file name, from its mDNS host name ("Adas-MacBook-Pro")
    address: str  # IPv4 address it announced
    port: int  # its SSH port
    model: str | None  # model identifier from _device-info ("Mac16,10"), None if it announced none
    source: str = SOURCE_MDNS
    instance: str = ""  # the announced instance name ("Ada's MacBook Pro")
    server: str = ""  # its mDNS host name without the trailing dot ("Adas-MacBook-Pro.local")


@dataclass(frozen=True, slots=True)
class Candidate:
    """One machine the wizard can offer: where it came from and the HostSpec to connect with."""

    name: str
    address: str  # what SSH connects to
    port: int
    model: str | None
    source: str  # "hosts.json" | "mDNS" | "both" | "added"
    spec: HostSpec
    note: str = ""  # e.g. mDNS saw the machine at another address than hosts.json says


def interfaces_from_env(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The IPv4 addresses in MACRUN_MDNS_INTERFACES, or None when it is unset or empty."""
    raw = (environ if environ is not None else os.environ).get(INTERFACES_ENV, "")
    items = [part.strip() for part in raw.split(",") if part.strip()]
    if not items:
        return None
    for item in items:
        try:
            ipaddress.IPv4Address(item)
        except ValueError:
            raise ConfigError(f"{INTERFACES_ENV}: {item!r} is not an IPv4 address",
                              hint=f"set it to this machine's addresses, e.g. {INTERFACES_ENV}=192.168.1.10"
                                   " (comma-separated), or unset it to browse every interface") from None
    return items


def host_name_for(server: str, instance: str) -> str:
    """A hosts-file name for an announced machine: its mDNS host label, else its instance name, cleaned."""
    label = server.rstrip(".")
    if label.endswith(".local"):
        label = label[: -len(".local")]
    for text in (label, instance):
        cleaned = _NAME_BAD.sub("-", text.replace("'", "")).strip("-._")[:63]
        if cleaned:
            return cleaned
    return "mac"


def pick_address(addresses: Sequence[str]) -> str | None:
    """The address to reach a machine at: routable IPv4 first, link-local (169.254/16) last, never loopback."""
    usable = []
    for text in addresses:
        try:
            ip = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if not ip.is_loopback and not ip.is_unspecified:
            usable.append(ip)
    usable.sort(key=lambda ip: ip.is_link_local)  # stable: keeps the announced order otherwise
    return str(usable[0]) if usable else None


def instance_of(service_name: str, service_type: str) -> str:
    """`Ada's Mac._ssh._tcp.local.` -> `Ada's Mac`."""
    suffix = "." + service_type
    return service_name[: -len(suffix)] if service_name.endswith(suffix) else service_name


def to_discovered(instance: str, server: str, addresses: Sequence[str], port: int,
                  model: str | None) -> DiscoveredHost | None:
    """Build a DiscoveredHost from resolved service data; None when it has no usable IPv4 address."""
    address = pick_address(addresses)
    if address is None:
        return None
    return DiscoveredHost(name=host_name_for(server, instance), address=address, port=port, model=model,
                          instance=instance, server=server.rstrip("."))


def browse(timeout: float, interfaces: Sequence[str] | None = None) -> list[DiscoveredHost]:
    """Listen for `timeout` seconds for machines announcing SSH over mDNS (IPv4); return them by name.

    `interfaces`: IPv4 addresses of this machine to browse on (default: every interface). Each `_ssh._tcp`
    instance is resolved to an address and port as soon as it is seen; its model comes from the
    `_device-info._tcp` instance of the same name. Raises HostError if mDNS cannot be started there.
    """
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

    seen: queue.Queue[tuple[str, str]] = queue.Queue()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # Runs on zeroconf's own thread, which must not block: resolving happens on ours.
        if state_change is not ServiceStateChange.Removed:
            seen.put((service_type, name))

    where = ", ".join(interfaces) if interfaces else "every interface"
    try:
        zc = Zeroconf(interfaces=list(interfaces) if interfaces else InterfaceChoice.All,
                      ip_version=IPVersion.V4Only)
    except (OSError, ValueError) as exc:
        raise HostError(f"cannot browse mDNS on {where}: {exc}",
                        hint=f"check {INTERFACES_ENV} (addresses of this machine), or skip mDNS with --no-mdns"
                        ) from exc
    ssh: dict[str, tuple[str, list[str], int]] = {}  # instance -> (server, addresses, port)
    models: dict[str, str] = {}
    try:
        browsers = [ServiceBrowser(zc, kind, handlers=[on_change]) for kind in (SSH_SERVICE, DEVICE_INFO_SERVICE)]
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                kind, name = seen.get(timeout=left)
            except queue.Empty:
                break
            instance = instance_of(name, kind)
            if (kind == SSH_SERVICE and instance in ssh) or (kind == DEVICE_INFO_SERVICE and instance in models):
                continue
            info = zc.get_service_info(kind, name, timeout=max(MIN_RESOLVE_MS, int(left * 1000)))
            if info is None:
                continue  # no answer in time; a later "Updated" event retries it
            if kind == SSH_SERVICE:
                ssh[instance] = (info.server or "", info.parsed_addresses(IPVersion.V4Only), info.port or 22)
            else:
                raw = (info.properties or {}).get(b"model")
                if raw:
                    models[instance] = raw.decode("utf-8", "replace")
        for b in browsers:
            b.cancel()
    finally:
        zc.close()
    found = [to_discovered(inst, server, addrs, port, models.get(inst)) for inst, (server, addrs, port) in ssh.items()]
    return unique_names([h for h in found if h is not None])


def unique_names(hosts: Sequence[DiscoveredHost]) -> list[DiscoveredHost]:
    """Sort by name and make names unique ("mac", "mac-2"); one entry per (address, port)."""
    out: list[DiscoveredHost] = []
    names: set[str] = set()
    targets: set[tuple[str, int]] = set()
    for host in sorted(hosts, key=lambda h: (h.name.lower(), h.address)):
        if (host.address, host.port) in targets:
            continue
        targets.add((host.address, host.port))
        name, n = host.name, 2
        while name.lower() in names:
            name, n = f"{host.name}-{n}", n + 1
        names.add(name.lower())
        out.append(replace(host, name=name))
    return out


def new_host_spec(name: str, address: str, port: int, template: HostSpec | None = None) -> HostSpec:
    """A HostSpec for a machine not in the hosts file, taking user/python/workdir/... from `template`."""
    base = template or HostSpec(name=name, hostname=address)
    return replace(base, name=name, hostname=address, port=None if port == 22 else port, ips=(), fast_ips=())


def merge_hosts(file_hosts: Sequence[HostSpec], discovered: Sequence[DiscoveredHost], *,
                template: HostSpec | None = None) -> list[Candidate]:
    """One list of machines: the hosts file's, in file order, then the ones only mDNS found, by name.

    A discovered machine is the same as a file entry when the entry's host is its address or its mDNS
    host name ("mbp.local") on the same port, or, failing that, when the names match; it is then listed
    once, as "both", with the file's settings (the file is what the user wrote) and mDNS's model. A name
    match at another address is noted, not silently changed. Machines only mDNS found get settings from
    `template` (e.g. the hosts file's defaults) and a name that no file entry uses.
    """
    remaining = list(discovered)
    out: list[Candidate] = []
    for spec in file_hosts:
        port = spec.port or 22
        match = next((d for d in remaining if d.port == port and spec.hostname.lower().rstrip(".") in
                      (d.address, d.server.lower(), d.name.lower() + ".local")), None)
        note = ""
        if match is None:
            match = next((d for d in remaining if d.name.lower() == spec.name.lower()), None)
            if match is not None:
                note = f"mDNS sees it at {match.address}:{match.port}"
        if match is not None:
            remaining.remove(match)
        out.append(Candidate(name=spec.name, address=spec.hostname, port=port,
                             model=match.model if match else None,
                             source=SOURCE_BOTH if match else SOURCE_FILE, spec=spec, note=note))
    taken = {c.name.lower() for c in out}
    for host in sorted(remaining, key=lambda h: h.name.lower()):
        name, n = host.name, 2
        while name.lower() in taken:
            name, n = f"{host.name}-{n}", n + 1
        taken.add(name.lower())
        out.append(Candidate(name=name, address=host.address, port=host.port, model=host.model,
                             source=host.source, spec=new_host_spec(name, host.address, host.port, template)))
    return out


def template_from_file(path: Path) -> HostSpec | None:
    """The hosts file's "defaults" as a HostSpec, for machines it does not list yet (None: no defaults).

    Giving new machines the file's defaults means they are saved without repeating them.
    """
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(data, dict) or not isinstance(data.get("defaults"), dict):
        return None
    probe = {"defaults": data["defaults"], "hosts": [{"host": "template.invalid"}]}
    return parse_hosts(probe, str(path), base_dir=path.parent, check_files=False)[0]


def candidate_from_address(text: str, template: HostSpec | None = None) -> Candidate:
    """A machine typed in by hand: "studio.local", "192.168.1.20", "ada@mbp.local" or "mbp.local:2222".

    Checked with the hosts file's own rules; raises HostsError naming what is wrong with `text`.
    """
    user, _, rest = text.strip().rpartition("@")
    entry: dict[str, Any] = {"host": rest}
    if rest.count(":") == 1:  # host:port (an IPv6 literal has more colons and is left whole, to be refused)
        host, _, port = rest.partition(":")
        entry = {"host": host, "port": int(port) if port.isdigit() else port}
    if user:
        entry["user"] = user
    try:
        spec = parse_hosts({"hosts": [entry]}, "address", check_files=False)[0]
    except HostsError as exc:  # 'address: hosts[0] (...): field "host" must ...': keep the last part
        raise HostsError(f"cannot use {text!r}: {exc.message.split(': ', 2)[-1]}", hint=exc.hint) from None
    if template is not None:
        spec = replace(template, name=spec.name, hostname=spec.hostname, user=spec.user or template.user,
                       port=spec.port)
    return Candidate(name=spec.name, address=spec.hostname, port=spec.port or 22, model=None, source=SOURCE_ADDED,
                     spec=spec)
