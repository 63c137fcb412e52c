"""setup-thunderbolt's planner: the cable map (Thunderbolt UIDs, then IPv6 neighbour MACs), addresses that clash
with nothing, a second apply that changes nothing, an undo that reverses exactly what was done; and the
pieces around it (commands, sudo, the hosts file's record)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distributed.probe import parse_hardware_ports
from launcher.cli import app
from launcher.room.hosts import load_hosts
from launcher.thunderbolt.rdma import parse_thunderbolt
from launcher.thunderbolt.tbsetup import read_record, run_actions, save_doc, sudo_wrap, updated_hosts_doc
from launcher.thunderbolt.tbsetup_parse import HostNet, NetIface
from launcher.thunderbolt.tbsetup_plan import (
    ADD,
    DEL,
    DOWN,
    JOIN,
    LEAVE,
    UP,
    Action,
    End,
    HostRecord,
    find_cables,
    plan_setup,
    plan_undo,
)
from launcher.transport.sshconn import CommandResult
from tests.support.recorded_rdma import Room

ORDER = ["h0", "h1", "h2"]


def mac_of(host: str, iface: str) -> str:
    return f"02:00:00:00:{ORDER.index(host) if host in ORDER else 9:02x}:{int(iface[-1]):02x}"


def lab_ring(addresses: Mapping[tuple[str, str], Sequence[str]] = (), wifi: str = "10.232.0.{}/24",
             hide_neighbours_of: str = "") -> dict[str, HostNet]:
    """The lab's three hosts as the gathering saw them: h_i thunderbolt0 is cabled to h_(i+1) thunderbolt1."""
    addresses = dict(addresses)
    nets = {}
    for i, host in enumerate(ORDER):
        peer0, peer1 = ORDER[(i + 1) % 3], ORDER[(i - 1) % 3]
        ifaces = [NetIface("lo", None, True, ("127.0.0.1/8",)),
                  NetIface("wifi0", f"02:00:00:00:{i:02x}:ff", True, (wifi.format(10 + i),))]
        ifaces += [NetIface(f"thunderbolt{k}", mac_of(host, f"thunderbolt{k}"), True,
                            tuple(addresses.get((host, f"thunderbolt{k}"), ())), True) for k in (0, 1)]
        neigh = {"thunderbolt0": (mac_of(peer0, "thunderbolt1"),), "thunderbolt1": (mac_of(peer1, "thunderbolt0"),)}
        nets[host] = HostNet("Linux", tuple(ifaces), root=True, neighbours={} if host == hide_neighbours_of else neigh)
    return nets


def macs(room: Room, names: Sequence[str], *, neighbours: bool = False, ports: bool = True) -> dict[str, HostNet]:
    """Macs of `room` as the gathering saw them: Thunderbolt ports in an active bridge0, a LAN on en0."""
    nets = {}
    for k, name in enumerate(names):
        mac = room.macs[name]
        tb = [mac.iface(r) for r in range(1, mac.receptacles + 1)]
        ifaces = [NetIface("en0", f"3c:22:fb:00:{k:02x}:00", True, (f"192.168.1.{20 + k}/24",)),
                  NetIface("bridge0", f"36:aa:bb:{k:02x}:dd:00", True, ("169.254.3.7/16",), members=tuple(tb))]
        ifaces += [NetIface(i, f"36:aa:bb:{k:02x}:dd:{n:02x}", True, (), True) for n, i in enumerate(tb)]
        found, _ = parse_thunderbolt(mac.thunderbolt(room), parse_hardware_ports(mac.hardware_ports()))
        nets[name] = HostNet("Darwin", tuple(ifaces), tuple(found) if ports else (), sudo_without_password=False)
    if neighbours:  # what the neighbour probe would find: the other end's MAC on each cabled port
        by_iface = {(n, i.name): i.mac for n, net in nets.items() for i in net.ifaces}
        for name in names:
            seen = {}
            for r, (peer, their) in room.macs[name].peers.items():
                if peer in nets:
                    seen[room.macs[name].iface(r)] = (by_iface[(peer, room.macs[peer].iface(their))],)
            nets[name] = replace(nets[name], neighbours=seen)
    return nets


def simulate(nets: Mapping[str, HostNet], actions: Mapping[str, Sequence[Action]]) -> dict[str, HostNet]:
    """The hosts after their actions ran, as a second gathering would see them."""
    out = {}
    for host, net in nets.items():
        ifaces = {i.name: i for i in net.ifaces}
        for a in actions.get(host, ()):
            i = ifaces[a.iface]
            if a.verb == ADD:
                ifaces[a.iface] = replace(i, ipv4=i.ipv4 + (a.address,))
            elif a.verb == DEL:
                ifaces[a.iface] = replace(i, ipv4=tuple(x for x in i.ipv4 if x != a.address))
            elif a.verb == LEAVE:
                br = ifaces[a.bridge]
                ifaces[a.bridge] = replace(br, members=tuple(m for m in br.members if m != a.iface))
                ifaces[a.iface] = replace(ifaces[a.iface], master=None)
            elif a.verb == JOIN:
                ifaces[a.bridge] = replace(ifaces[a.bridge], members=ifaces[a.bridge].members + (a.iface,))
            elif a.verb in (DOWN, UP):
                ifaces[a.iface] = replace(i, up=a.verb == UP)
        out[host] = replace(net, ifaces=tuple(ifaces.values()))
    return out


def ends(plan_cables: Sequence) -> list[tuple[str, str, str, str]]:
    return [(c.cable.a.host, c.cable.a.iface, c.cable.b.host, c.cable.b.iface) for c in plan_cables]


# ---- the cable map -------------------------------------------------------------------------------------

def test_the_lab_ring_is_mapped_by_neighbour_macs_even_when_one_side_saw_nothing() -> None:
    for hidden in ("", "h1"):
        cables, loose = find_cables(ORDER, lab_ring(hide_neighbours_of=hidden))
        assert [(c.a, c.b, c.found_by) for c in cables] == [
            (End("h0", "thunderbolt0"), End("h1", "thunderbolt1"), "IPv6 neighbours"),
            (End("h0", "thunderbolt1"), End("h2", "thunderbolt0"), "IPv6 neighbours"),
            (End("h1", "thunderbolt0"), End("h2", "thunderbolt1"), "IPv6 neighbours")]
        assert loose == []


def test_macs_are_mapped_by_thunderbolt_uids_and_a_port_to_a_stranger_is_loose() -> None:
    room = Room.of("a", "b", "c").cable("a", "b").cable("b", "c").cable("a", "c")
    cables, loose = find_cables(["a", "b"], macs(room, ["a", "b"]))  # c is not in the hosts file
    assert [(str(c.a), str(c.b), c.found_by) for c in cables] == [("a en2", "b en2", "Thunderbolt UIDs")]
    assert loose == [End("a", "en3"), End("b", "en3")]


def test_a_mac_without_system_profiler_data_falls_back_to_neighbour_macs() -> None:
    room = Room.of("a", "b").cable("a", "b")
    nets = macs(room, ["a", "b"], neighbours=True)
    nets["b"] = replace(nets["b"], ports=())  # e.g. system_profiler timed out there
    cables, _ = find_cables(["a", "b"], nets)
    assert [(str(c.a), str(c.b), c.found_by) for c in cables] == [("a en2", "b en2", "IPv6 neighbours")]


# ---- addresses --------------------------------------------------------------------------------------------

def test_addresses_are_one_slash_30_per_cable_in_a_fixed_order() -> None:
    nets = lab_ring()
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], {})
    assert [(c.a_ip, c.b_ip, c.state) for c in plan.cables] == [
        ("10.100.0.1/30", "10.100.0.2/30", "to add"), ("10.100.0.5/30", "10.100.0.6/30", "to add"),
        ("10.100.0.9/30", "10.100.0.10/30", "to add")]
    assert plan.fast_ips() == {"h0": ("10.100.0.1", "10.100.0.5"), "h1": ("10.100.0.2", "10.100.0.9"),
                               "h2": ("10.100.0.6", "10.100.0.10")}
    reordered = dict(reversed(list(nets.items())))  # the order hosts answered in must not matter
    assert plan_setup(ORDER, reordered, find_cables(ORDER, reordered)[0], {}) == plan


def test_addresses_avoid_every_subnet_any_host_already_has() -> None:
    nets = lab_ring(wifi="10.100.0.{}/24")  # the hosts' LAN sits where the first cables would go
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], {})
    assert [c.a_ip for c in plan.cables] == ["10.100.1.1/30", "10.100.1.5/30", "10.100.1.9/30"]
    nets = lab_ring(wifi="10.0.0.{}/8")  # a LAN over all of 10/8: the 10.x pools are skipped whole
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], {})
    assert [c.a_ip for c in plan.cables] == ["172.29.0.1/30", "172.29.0.5/30", "172.29.0.9/30"]
    nets = lab_ring({("h2", "thunderbolt0"): ["10.100.0.6/30"]})  # someone else's address on one port
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], {})
    assert "10.100.0.4/30" not in {c.a_ip for c in plan.cables} and plan.cables[0].a_ip == "10.100.0.1/30"
    assert plan.cables[1].a_ip == "10.100.0.9/30"


def test_cables_addressed_by_hand_are_left_alone_and_still_given_to_the_ring() -> None:
    by_hand = {("h0", "thunderbolt0"): ["10.231.1.1/30"], ("h1", "thunderbolt1"): ["10.231.1.2/30"]}
    nets = lab_ring(by_hand)
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], {})
    assert [(c.a_ip, c.b_ip, c.state) for c in plan.cables][0] == ("10.231.1.1/30", "10.231.1.2/30", "by hand")
    assert Action(ADD, "thunderbolt0", "10.231.1.1/30") not in plan.actions["h0"]
    assert "10.231.1.1" in plan.fast_ips()["h0"]
    assert ("thunderbolt0", "10.231.1.1/30") not in plan.record["h0"].addresses


# ---- apply twice, then undo --------------------------------------------------------------------------------

def test_a_second_apply_changes_nothing_and_keeps_its_addresses() -> None:
    nets = lab_ring(wifi="10.100.0.{}/29")  # h0's LAN pushes the cables past 10.100.0.0/29 ...
    nets["h1"] = replace(nets["h1"], ifaces=tuple(replace(i, ipv4=("10.232.0.11/24",)) if i.name == "wifi0" else i
                                                    for i in nets["h1"].ifaces))
    cables = find_cables(ORDER, nets)[0]
    first = plan_setup(ORDER, nets, cables, {})
    assert first.changes == 6 and all(a.verb == ADD for acts in first.actions.values() for a in acts)
    after = simulate(nets, first.actions)
    second = plan_setup(ORDER, after, cables, first.record)
    assert second.changes == 0 and {c.state for c in second.cables} == {"in place"}
    assert [c.a_ip for c in second.cables] == [c.a_ip for c in first.cables] and second.record == first.record
    # ... and when that LAN goes away, macrun's recorded cables stay where they are rather than move.
    moved = simulate(lab_ring(wifi="172.16.0.{}/24"), first.actions)
    assert plan_setup(ORDER, moved, cables, first.record).changes == 0


def test_an_address_on_a_port_that_lost_its_cable_is_removed() -> None:
    nets = lab_ring({("h0", "thunderbolt1"): ["10.100.0.5/30"]})
    nets = {h: replace(n, neighbours={k: v for k, v in n.neighbours.items() if (h, k) in (
        ("h0", "thunderbolt0"), ("h1", "thunderbolt1"))}) for h, n in nets.items()}  # one cable left
    previous = {"h0": HostRecord((("thunderbolt0", "10.100.0.1/30"), ("thunderbolt1", "10.100.0.5/30")))}
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], previous)
    assert plan.actions["h0"] == (Action(DEL, "thunderbolt1", "10.100.0.5/30"),
                                  Action(ADD, "thunderbolt0", "10.100.0.1/30"))
    assert plan.record["h0"].addresses == (("thunderbolt0", "10.100.0.1/30"),)


def test_macs_leave_the_thunderbolt_bridge_which_goes_down_and_undo_brings_it_back() -> None:
    room = Room.of("a", "b").cable("a", "b")
    nets = macs(room, ["a", "b"])
    plan = plan_setup(["a", "b"], nets, find_cables(["a", "b"], nets)[0], {})
    assert [a.command("Darwin") for a in plan.actions["a"]] == [
        "ifconfig bridge0 deletem en2", "ifconfig bridge0 down",
        "ifconfig en2 inet 10.100.0.1 netmask 255.255.255.252 alias"]
    assert plan.record["a"] == HostRecord((("en2", "10.100.0.1/30"),), (("bridge0", "en2"),), ("bridge0",))
    after = simulate(nets, plan.actions)
    assert plan_setup(["a", "b"], after, find_cables(["a", "b"], after)[0], plan.record).changes == 0
    undo = plan_undo(["a", "b"], after, plan.record)
    assert [a.command("Darwin") for a in undo["a"]] == [
        "ifconfig en2 inet 10.100.0.1 -alias", "ifconfig bridge0 addm en2", "ifconfig bridge0 up"]
    restored = simulate(after, undo)
    assert {h: {i.name: (i.up, i.ipv4, set(i.members)) for i in n.ifaces} for h, n in restored.items()} == \
        {h: {i.name: (i.up, i.ipv4, set(i.members)) for i in n.ifaces} for h, n in nets.items()}
    assert plan_undo(["a", "b"], nets, plan.record) == {"a": (), "b": ()}  # after a reboot: nothing to undo


def test_a_bridge_with_other_members_than_thunderbolt_ports_stays_up() -> None:
    room = Room.of("a", "b").cable("a", "b")
    nets = macs(room, ["a", "b"])
    vm = NetIface("vmenet0", "aa:00:00:00:00:01", True)
    nets["a"] = replace(nets["a"], ifaces=tuple(replace(i, members=i.members + ("vmenet0",)) if i.name == "bridge0"
                                                else i for i in nets["a"].ifaces) + (vm,))
    plan = plan_setup(["a", "b"], nets, find_cables(["a", "b"], nets)[0], {})
    assert [a.verb for a in plan.actions["a"]] == [LEAVE, ADD] and [a.verb for a in plan.actions["b"]] == [
        LEAVE, DOWN, ADD]


def test_linux_commands_and_undo_of_a_port_taken_out_of_its_bridge() -> None:
    assert Action(ADD, "thunderbolt0", "10.100.0.1/30").command("Linux") == "ip addr add 10.100.0.1/30 dev thunderbolt0"
    assert Action(DEL, "thunderbolt0", "10.100.0.1/30").command("Linux") == "ip addr del 10.100.0.1/30 dev thunderbolt0"
    assert Action(LEAVE, "tb0", bridge="br0").command("Linux") == "ip link set dev tb0 nomaster"
    assert Action(JOIN, "tb0", bridge="br0").command("Linux") == "ip link set dev tb0 master br0"
    nets = lab_ring()
    nets["h0"] = replace(nets["h0"], ifaces=tuple(replace(i, master="br0") if i.name == "thunderbolt0" else i
                                                  for i in nets["h0"].ifaces) + (NetIface("br0", "02:0b:00:00:00:00"),))
    plan = plan_setup(ORDER, nets, find_cables(ORDER, nets)[0], {})
    assert plan.actions["h0"][0] == Action(LEAVE, "thunderbolt0", bridge="br0")  # never taken down on Linux
    assert DOWN not in {a.verb for a in plan.actions["h0"]}


# ---- sudo, the password, the hosts file ----------------------------------------------------------------------

def test_sudo_is_skipped_for_root_and_reads_the_password_from_stdin_only() -> None:
    root, user = HostNet("Linux", (), root=True), HostNet("Darwin", ())
    assert sudo_wrap(["ip addr add 10.100.0.1/30 dev tb0"], root, password=False) == \
        "sh -c 'set -e; ip addr add 10.100.0.1/30 dev tb0'"
    assert sudo_wrap(["ifconfig bridge0 down"], user, password=True).startswith("sudo -S -p '' sh -c ")
    assert sudo_wrap(["ifconfig bridge0 down"], user, password=False).startswith("sudo -n sh -c ")


class FakeConn:
    """Stands in for an SSHConnection: records the command and stdin, answers like sudo would."""

    def __init__(self, name: str, rc: int = 0, stderr: str = "") -> None:
        self.host = type("H", (), {"name": name})()
        self.calls: list[tuple[str, bytes | None]] = []
        self.rc, self.stderr = rc, stderr

    def run(self, cmd: str, *, timeout: float = 30.0, stdin: bytes | None = None) -> CommandResult:
        self.calls.append((cmd, stdin))
        return CommandResult(self.rc, "", self.stderr)


def test_the_password_travels_on_stdin_and_a_refusal_does_not_repeat_it() -> None:
    nets = {"a": HostNet("Darwin", ()), "b": HostNet("Darwin", ()), "c": HostNet("Linux", (), root=True)}
    conns = [FakeConn("a"), FakeConn("b", 1, "Sorry, try again.\nsudo: 1 incorrect password attempt"), FakeConn("c")]
    actions = {h: (Action(DOWN, "bridge0"),) for h in nets}
    failed = run_actions(conns, nets, actions, "hunter2")  # type: ignore[arg-type]
    assert failed == {"b": "sudo did not accept the password"}
    (cmd, stdin), = conns[0].calls
    assert stdin == b"hunter2\n" and "hunter2" not in cmd and cmd.startswith("sudo -S")
    (cmd, stdin), = conns[2].calls
    assert stdin is None and cmd.startswith("sh -c")  # root: no sudo, no password


def test_the_hosts_file_gets_the_cable_addresses_and_undo_takes_only_those_away(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    doc = {"_doc": "my room", "hosts": [{"name": "h0", "host": "10.0.0.10", "_note": "desk", "fast_ips": ["10.9.9.1"]},
                                        {"name": "h1", "host": "10.0.0.11"}]}
    path.write_text(json.dumps(doc))
    specs = load_hosts(path)
    record = {"h0": HostRecord((("tb0", "10.100.0.1/30"),)), "h1": HostRecord((("tb1", "10.100.0.2/30"),))}
    applied = updated_hosts_doc(doc, specs, {}, record, {"h0": ["10.100.0.1"], "h1": ["10.100.0.2"]})
    assert save_doc(path, doc, applied) and not save_doc(path, applied, applied)  # unchanged: not rewritten
    assert [h.fast_ips for h in load_hosts(path)] == [("10.9.9.1", "10.100.0.1"), ("10.100.0.2",)]
    data, back = read_record(path)
    assert back == record and data is not None and data["hosts"][0]["_note"] == "desk" and data["_doc"] == "my room"
    undone = updated_hosts_doc(data, load_hosts(path), back, {}, {})
    assert save_doc(path, data, undone)
    assert json.loads(path.read_text()) == doc  # exactly as the user wrote it


def test_apply_and_undo_together_are_refused_on_the_command_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["hosts", "setup-thunderbolt", "--hosts", str(tmp_path / "h.json"),
                                      "--apply", "--undo"])
    assert result.exit_code == 2 and "--apply and --undo do opposite things" in result.output


@pytest.mark.parametrize("bad", [None, "x", {"addresses": [["only-one"]], "bridges_down": [1, "bridge0"]}])
def test_a_damaged_record_reads_as_what_it_can(bad: object) -> None:
    rec = HostRecord.from_json(bad)
    assert rec.addresses == () and rec.downed in ((), ("bridge0",))
