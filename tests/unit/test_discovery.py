"""Unit tests for launcher/room/discovery.py: names, addresses, the env switch, and merging with hosts.json.

Browsing itself needs multicast between machines; it is tested against the lab's announcers in
tests/lab/test_lab_wizard.py (bound to the lab's address, never this machine's real interfaces).
"""

from __future__ import annotations

import socket

import pytest
from zeroconf import ServiceInfo

from distributed.errors import ConfigError
from launcher.room.discovery import (
    DEVICE_INFO_SERVICE,
    SSH_SERVICE,
    DiscoveredHost,
    host_name_for,
    instance_of,
    interfaces_from_env,
    merge_hosts,
    new_host_spec,
    pick_address,
    to_discovered,
    unique_names,
)
from launcher.room.hosts import HostSpec, parse_hosts


def found(name: str, address: str, *, port: int = 22, model: str | None = "Mac16,10",
          server: str | None = None) -> DiscoveredHost:
    return DiscoveredHost(name=name, address=address, port=port, model=model, instance=name,
                          server=server if server is not None else f"{name}.local")


# ---- what one announcement becomes --------------------------------------------------------------------------
@pytest.mark.parametrize(("server", "instance", "expected"), [
    ("Adas-MacBook-Pro.local.", "Ada's MacBook Pro", "Adas-MacBook-Pro"),
    ("", "Ada's MacBook Pro", "Adas-MacBook-Pro"),  # no host name: the instance name, cleaned
    ("studio.local.", "Studio", "studio"),
    ("weird name!.local.", "x", "weird-name"),
    ("", "!!!", "mac"),
])
def test_host_name_is_a_valid_hosts_file_name(server: str, instance: str, expected: str) -> None:
    name = host_name_for(server, instance)
    assert name == expected
    parse_hosts({"hosts": [{"name": name, "host": "10.0.0.1"}]}, "t")  # the hosts file accepts it


def test_pick_address_prefers_routable_ipv4_and_never_loopback() -> None:
    assert pick_address(["169.254.10.2", "192.168.1.20"]) == "192.168.1.20"
    assert pick_address(["169.254.10.2"]) == "169.254.10.2"  # a Thunderbolt-only Mac is still reachable
    assert pick_address(["127.0.0.1", "fe80::1", "not an ip"]) is None
    assert pick_address(["10.0.0.2", "10.0.0.1"]) == "10.0.0.2"  # otherwise the announced order


def test_service_info_as_macos_announces_it_becomes_a_discovered_host() -> None:
    # The records a Mac publishes, built offline the way mDNS would deliver them.
    ssh = ServiceInfo(SSH_SERVICE, f"Ada's MacBook Pro.{SSH_SERVICE}", port=22, server="Adas-MacBook-Pro.local.",
                      addresses=[socket.inet_aton("169.254.3.3"), socket.inet_aton("192.168.1.20")])
    info = ServiceInfo(DEVICE_INFO_SERVICE, f"Ada's MacBook Pro.{DEVICE_INFO_SERVICE}", port=0,
                       properties={"model": "MacBookPro18,3"}, server="Adas-MacBook-Pro.local.")
    instance = instance_of(ssh.name, SSH_SERVICE)
    assert instance == instance_of(info.name, DEVICE_INFO_SERVICE) == "Ada's MacBook Pro"
    host = to_discovered(instance, ssh.server or "", ssh.parsed_addresses(), ssh.port or 22,
                         info.properties[b"model"].decode())
    assert host == DiscoveredHost(name="Adas-MacBook-Pro", address="192.168.1.20", port=22, model="MacBookPro18,3",
                                  instance="Ada's MacBook Pro", server="Adas-MacBook-Pro.local")
    assert to_discovered(instance, "x.local.", ["127.0.0.1"], 22, None) is None


def test_unique_names_sorts_dedupes_addresses_and_suffixes_clashes() -> None:
    hosts = unique_names([found("mac", "10.0.0.3"), found("Mac", "10.0.0.2"), found("air", "10.0.0.9"),
                          found("mac-again", "10.0.0.2")])  # the same machine under two instance names
    assert [(h.name, h.address) for h in hosts] == [("air", "10.0.0.9"), ("Mac", "10.0.0.2"), ("mac-2", "10.0.0.3")]


# ---- MACRUN_MDNS_INTERFACES ---------------------------------------------------------------------------------
def test_interfaces_from_env() -> None:
    assert interfaces_from_env({}) is None
    assert interfaces_from_env({"MACRUN_MDNS_INTERFACES": " "}) is None
    assert interfaces_from_env({"MACRUN_MDNS_INTERFACES": "10.231.0.1, 192.168.1.5,"}) == ["10.231.0.1",
                                                                                           "192.168.1.5"]
    with pytest.raises(ConfigError, match="'en0' is not an IPv4 address") as err:
        interfaces_from_env({"MACRUN_MDNS_INTERFACES": "10.0.0.1,en0"})
    assert err.value.hint and "unset it" in err.value.hint


# ---- merging ------------------------------------------------------------------------------------------------
def test_merge_matches_by_address_keeps_file_settings_and_adds_mdns_model() -> None:
    file_hosts = [HostSpec(name="studio", hostname="192.168.1.20", python="/opt/homebrew/bin/python3", slots=2)]
    merged = merge_hosts(file_hosts, [found("Studio-2", "192.168.1.20", model="Mac14,13")])
    assert len(merged) == 1
    c = merged[0]
    assert (c.name, c.address, c.source, c.model, c.note) == ("studio", "192.168.1.20", "both", "Mac14,13", "")
    assert c.spec is file_hosts[0]  # what the user wrote wins


def test_merge_matches_a_local_name_in_the_file() -> None:
    merged = merge_hosts([HostSpec(name="mbp", hostname="Adas-MacBook-Pro.local")],
                         [found("Adas-MacBook-Pro", "192.168.1.30")])
    assert [(c.name, c.source, c.address) for c in merged] == [("mbp", "both", "Adas-MacBook-Pro.local")]


def test_merge_same_name_elsewhere_is_noted_not_changed() -> None:
    merged = merge_hosts([HostSpec(name="air", hostname="192.168.1.40")], [found("air", "192.168.1.41")])
    assert len(merged) == 1
    assert merged[0].address == "192.168.1.40" and merged[0].source == "both"
    assert merged[0].note == "mDNS sees it at 192.168.1.41:22"


def test_merge_another_port_is_another_machine() -> None:
    merged = merge_hosts([HostSpec(name="box", hostname="10.0.0.5", port=2222)], [found("other", "10.0.0.5")])
    assert [(c.name, c.source, c.port) for c in merged] == [("box", "hosts.json", 2222), ("other", "mDNS", 22)]


def test_merge_order_sources_templates_and_name_clashes() -> None:
    template = HostSpec(name="-", hostname="-", user="ada", python="/opt/homebrew/bin/python3", workdir="~/mr")
    file_hosts = [HostSpec(name="zed", hostname="10.0.0.9"), HostSpec(name="mini", hostname="10.0.0.1")]
    merged = merge_hosts(file_hosts, [found("mini", "10.0.0.2", server="other.local"), found("air", "10.0.0.3"),
                                      found("zed", "10.0.0.9", port=2200)], template=template)
    # The file's entries first, in file order; then mDNS-only machines by name. "mini" at another address
    # matched the file entry by name; "zed" on another port did too (same name, noted).
    assert [(c.name, c.source) for c in merged] == [("zed", "both"), ("mini", "both"), ("air", "mDNS")]
    air = merged[2].spec
    assert (air.name, air.hostname, air.user, air.python, air.workdir, air.port) == (
        "air", "10.0.0.3", "ada", "/opt/homebrew/bin/python3", "~/mr", None)


def test_merge_gives_mdns_machines_a_free_name() -> None:
    merged = merge_hosts([HostSpec(name="mac", hostname="10.0.0.1"), HostSpec(name="mac-2", hostname="10.0.0.2")],
                         [found("mac", "10.0.0.1"), found("mac", "10.0.0.7", server="x.local")])
    assert [(c.name, c.address, c.source) for c in merged] == [
        ("mac", "10.0.0.1", "both"), ("mac-2", "10.0.0.2", "hosts.json"), ("mac-3", "10.0.0.7", "mDNS")]
    assert merged[2].spec.name == "mac-3"


def test_merge_with_nothing() -> None:
    assert merge_hosts([], []) == []
    only = merge_hosts([], [found("a", "10.0.0.1", port=2222)])
    assert only[0].spec == HostSpec(name="a", hostname="10.0.0.1", port=2222)


def test_new_host_spec_drops_per_host_fields_of_the_template() -> None:
    template = HostSpec(name="t", hostname="t", ips=("10.9.9.9",), fast_ips=("10.8.8.8",), slots=2)
    spec = new_host_spec("n", "10.0.0.1", 22, template)
    assert (spec.name, spec.hostname, spec.port, spec.ips, spec.fast_ips, spec.slots) == (
        "n", "10.0.0.1", None, (), (), 2)
