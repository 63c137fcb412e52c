"""RDMA over Thunderbolt as the probe reports it: the raw collection, the parsers, the peer map, the preflight table.

Every Mac case is recorded-format output (tests/support/recorded_rdma.py); nothing here needs a Mac.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from distributed import probe
from launcher.room import preflight
from launcher.room.preflight import HostFacts, InterfaceFacts
from launcher.thunderbolt.rdma import (
    RdmaFacts,
    describe_ports,
    parse_ibv_devices,
    parse_ibv_devinfo,
    parse_thunderbolt,
    peer_links,
)
from tests.support.recorded_rdma import IBV_DEVICES, IBV_DEVICES_NONE, Mac, Room, devinfo_block, uid

REPO = Path(__file__).resolve().parents[2]


# ---- parsers on recorded output --------------------------------------------------------------------

def test_ibv_devices_lists_the_devices_in_its_own_order() -> None:
    assert parse_ibv_devices(IBV_DEVICES) == ["rdma_en2", "rdma_en3", "rdma_en5", "rdma_en4", "rdma_en6",
                                             "rdma_en7"]
    assert parse_ibv_devices(IBV_DEVICES_NONE) == [] and parse_ibv_devices("") == []
    assert parse_ibv_devices("zsh: command not found: ibv_devices\n") == []


def test_ibv_devinfo_gives_each_devices_port_states() -> None:
    text = devinfo_block("rdma_en2") + devinfo_block("rdma_en3", "PORT_DOWN (1)")
    assert parse_ibv_devinfo(text) == {"rdma_en2": ("PORT_ACTIVE",), "rdma_en3": ("PORT_DOWN",)}
    assert parse_ibv_devinfo("No IB devices found\n") == {} and parse_ibv_devinfo("") == {}


def test_thunderbolt_json_maps_receptacles_to_interfaces_and_peers() -> None:
    room = Room(Mac("a", display_on=3), Mac("b", first_en=5)).cable("a", "b")
    raw = room.raw("a")
    ports, notes = parse_thunderbolt(str(raw["thunderbolt"]), raw["hardware_ports"])  # type: ignore[arg-type]
    assert notes == []
    by_receptacle = {p.receptacle: p for p in ports}
    first = by_receptacle["1"]
    assert (first.iface, first.uid, first.peer_uid, first.peer_name) == ("en2", uid("a", 1), uid("b", 1), "Mac Studio")
    assert first.speed == "Up to 80 Gb/s"
    assert by_receptacle["3"].peer_uid is None  # a display has no domain: not a Mac
    assert by_receptacle["2"].peer_uid is None and by_receptacle["2"].iface == "en3"
    b_ports, _ = parse_thunderbolt(str(room.raw("b")["thunderbolt"]), room.raw("b")["hardware_ports"])  # type: ignore[arg-type]
    assert b_ports[0].iface == "en5"  # b's Ethernet ports push its Thunderbolt devices up


def test_odd_thunderbolt_output_is_a_note_not_a_crash() -> None:
    assert parse_thunderbolt("", {}) == ([], [])
    assert parse_thunderbolt("{not json", {})[1] == ["system_profiler's Thunderbolt JSON did not parse"]
    assert parse_thunderbolt("[1, 2]", {})[1] == ["system_profiler's Thunderbolt JSON did not parse"]
    ports, notes = parse_thunderbolt(json.dumps({"SPThunderboltDataType": [
        "junk", {"_name": "no domain"}, {"domain_uuid_key": "U1", "receptacle_1_tag": {"receptacle_id_key": "9"},
                                         "_items": ["junk", {"_name": "Mac mini", "domain_uuid_key": "U2"}]}]}), {})
    assert [(p.uid, p.peer_uid, p.iface) for p in ports] == [("U1", "U2", None)]
    assert notes == ["Thunderbolt port 9 has no network device in networksetup"]


def test_rdma_facts_from_the_probe_are_empty_on_linux_and_tolerant_on_macos() -> None:
    assert RdmaFacts.from_probe({}) == RdmaFacts() and RdmaFacts.from_probe(None) == RdmaFacts()
    odd = RdmaFacts.from_probe({"ibv_devices": None, "ibv_devinfo": 7, "thunderbolt": "<html>",
                                "hardware_ports": "junk", "notes": ["ibv_devices took more than 5 s"]})
    assert odd.devices == () and odd.ports == ()
    assert odd.notes == ("ibv_devices took more than 5 s", "system_profiler's Thunderbolt JSON did not parse")
    unknown = RdmaFacts.from_probe({"ibv_devices": IBV_DEVICES, "ibv_devinfo": ""})
    assert unknown.devices[0].state == "state unknown" and not unknown.devices[0].active
    assert unknown.notes == ("ibv_devinfo gave no port states",)
    only_devinfo = RdmaFacts.from_probe({"ibv_devices": "", "ibv_devinfo": devinfo_block("rdma_en4")})
    assert [(d.name, d.active) for d in only_devinfo.devices] == [("rdma_en4", True)]


def test_peer_links_match_uids_across_hosts() -> None:
    room = Room.of("m1", "m2", "m3").mesh()
    facts = {n: RdmaFacts.from_probe(room.raw(n)) for n in room.macs}
    links = peer_links(facts)
    assert sorted(links) == [(a, b) for a in ("m1", "m2", "m3") for b in ("m1", "m2", "m3") if a != b]
    for (a, b), ends in links.items():
        assert len(ends) == 1 and ends[0].usable
        assert ends[0].device is not None and ends[0].device.name == f"rdma_{room.port_to(a, b)}"
    assert describe_ports("m1", facts) == ["rdma_en3 active → m3", "rdma_en4 active (no cable)",
                                           "rdma_en5 active (no cable)", "rdma_en2 active → m2"]


# ---- the probe's collection (standard library, Python 3.9, never raises) ----------------------------

def test_probe_reports_no_rdma_on_linux() -> None:
    assert probe.start_rdma_commands("Linux") == {}
    assert probe.finish_rdma_commands({}, {}) == {}
    out = subprocess.run([sys.executable, str(REPO / "distributed" / "probe.py"), "/tmp"], capture_output=True,
                         check=True, timeout=120)
    assert json.loads(out.stdout)["rdma"] == {}


def test_missing_rdma_commands_become_notes() -> None:
    started = probe.start_rdma_commands("Darwin")  # this Linux machine has none of them
    found = probe.finish_rdma_commands(started, {"en2": "Thunderbolt 1"}, timeout=5)
    assert found["ibv_devices"] == found["ibv_devinfo"] == found["thunderbolt"] == ""
    assert found["hardware_ports"] == {"en2": "Thunderbolt 1"}
    assert any(n.startswith("ibv_devices did not start") for n in found["notes"])
    assert any(n.startswith("system_profiler did not start") for n in found["notes"])


def test_a_hung_or_failing_rdma_command_is_killed_and_noted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "RDMA_COMMANDS", {"ibv_devices": ["printf", "%s", IBV_DEVICES],
                                                 "ibv_devinfo": ["sleep", "30"], "thunderbolt": ["false"]})
    found = probe.finish_rdma_commands(probe.start_rdma_commands("Darwin"), {}, timeout=0.5)
    assert found["ibv_devices"] == IBV_DEVICES and found["ibv_devinfo"] == found["thunderbolt"] == ""
    assert found["notes"] == ["sleep took more than 0.5 s", "false exited with status 1"]


def test_without_rdma_devices_the_slow_cable_map_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every launch waits for the probe: a Mac without RDMA must not pay for system_profiler.
    monkeypatch.setattr(probe, "RDMA_COMMANDS", {"ibv_devices": ["printf", "%s", IBV_DEVICES_NONE],
                                                 "ibv_devinfo": ["true"], "thunderbolt": ["sleep", "30"]})
    began = time.monotonic()
    found = probe.finish_rdma_commands(probe.start_rdma_commands("Darwin"), {}, timeout=60)
    assert time.monotonic() - began < 20 and found["thunderbolt"] == "" and found["notes"] == []
    assert probe._lists_devices(IBV_DEVICES) and not probe._lists_devices(IBV_DEVICES_NONE)


# ---- preflight: facts and table -------------------------------------------------------------------

def mac_facts(name: str, room: Room, *, bridge: bool = False) -> HostFacts:
    bridge0 = InterfaceFacts("bridge0", "thunderbolt", ("169.254.3.3/16",), ("en2", "en3"), up=bridge)
    return HostFacts(
        name=name, hostname=f"{name}.local", python_version="3.12.4", python_executable="/usr/bin/python3",
        os_name="Darwin", os_version="26.2", machine="arm64", chip="Apple M4 Pro", memory_bytes=64 * 2**30,
        cpu_count=14, disk_path="/Users/me", disk_free_bytes=400 * 2**30, battery_percent=None, on_ac=None,
        mlx_version="0.32.4", mlx_error=None, mlx_device="Device(gpu, 0)",
        interfaces=(InterfaceFacts("en0", "ethernet", ("192.168.1.20/24",)), bridge0), probe_seconds=0.2,
        rdma=RdmaFacts.from_probe(room.raw(name)))


def test_host_facts_carry_rdma_from_the_probe_json() -> None:
    room = Room.of("m1", "m2").cable("m1", "m2")
    data = {"hostname": "m1", "python_version": "3.9.6", "python_executable": "/usr/bin/python3",
            "os_name": "Darwin", "os_version": "26.2", "machine": "arm64", "chip": "Apple M4", "memory_bytes": 1,
            "cpu_count": 1, "disk_path": "/", "disk_free_bytes": 1, "interfaces": [], "rdma": room.raw("m1")}
    facts = HostFacts.from_probe("m1", data, 0.1)
    assert [d.name for d in facts.rdma.devices] == ["rdma_en3", "rdma_en4", "rdma_en5", "rdma_en2"]
    assert HostFacts.from_probe("m1", {**data, "rdma": "junk"}, 0.1).rdma == RdmaFacts()
    assert HostFacts.from_probe("m1", {k: v for k, v in data.items() if k != "rdma"}, 0.1).rdma == RdmaFacts()


def test_preflight_table_shows_which_mac_each_rdma_device_faces_and_warns_about_a_bridge() -> None:
    room = Room.of("m1", "m2").cable("m1", "m2")
    facts = {"m1": mac_facts("m1", room, bridge=True), "m2": mac_facts("m2", room)}
    problems = preflight.check_hosts(facts, local_mlx="0.32.4")
    assert [(p.host, p.severity) for p in problems] == [("m1", "warning")]
    assert "Thunderbolt Bridge bridge0 (en2, en3) is active" in problems[0].message
    assert "sudo ifconfig bridge0 down" in (problems[0].hint or "")
    console = Console(record=True, width=240, file=io.StringIO())
    console.print(preflight.render_preflight(facts, problems))
    text = console.export_text()
    assert "rdma_en2 active → m2" in text and "rdma_en2 active → m1" in text
