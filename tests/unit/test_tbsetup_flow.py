"""setup-thunderbolt's whole flow on two stand-in Macs (no Mac, no SSH): each answers the gathering command with
macOS-format output of its current state and applies the `ifconfig` commands it is sent, so apply, a second
apply, undo and the sudo password's path are checked end to end where the lab (Linux, root) cannot go."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from distributed.errors import HostError, UsageError
from launcher.room.hosts import load_hosts
from launcher.thunderbolt.tbsetup import setup_thunderbolt
from launcher.thunderbolt.tbsetup_parse import GATHER, MARK
from launcher.transport.sshconn import CommandResult
from tests.support.recorded_rdma import Room

PASSWORD = "correct horse"


class FakeMac:
    """A Mac with four Thunderbolt ports (en2-en5) in an active Thunderbolt Bridge, reached as user ada."""

    def __init__(self, name: str, index: int, room: Room) -> None:
        self.host = type("H", (), {"name": name, "python": "/usr/bin/python3"})()
        self.name, self.index, self.room = name, index, room
        self.ports = [f"en{i}" for i in range(2, 6)]
        self.inet: dict[str, list[tuple[str, str]]] = {p: [] for p in self.ports}
        self.members, self.bridge_up = list(self.ports), True
        self.commands: list[str] = []
        self.stdins: list[bytes | None] = []

    def ifconfig(self) -> str:
        lines = ["en0: flags=8863<UP,BROADCAST,SMART,RUNNING,SIMPLEX,MULTICAST> mtu 1500",
                 f"\tether 3c:22:fb:00:{self.index:02x}:00",
                 f"\tinet 192.168.1.{20 + self.index} netmask 0xffffff00 broadcast 192.168.1.255", "\tstatus: active"]
        for p in self.ports:
            lines += [f"{p}: flags=8963<UP,BROADCAST,SMART,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500",
                      f"\tether 36:aa:bb:{self.index:02x}:dd:{p[2:]}"]
            lines += [f"\tinet {ip} netmask {mask} broadcast 0.0.0.0" for ip, mask in self.inet[p]]
            lines += ["\tstatus: active"]
        lines += [f"bridge0: flags=88{'63<UP,' if self.bridge_up else '22<'}BROADCAST,SMART,RUNNING,SIMPLEX,"
                  "MULTICAST> mtu 1500", f"\tether 36:aa:bb:{self.index:02x}:dd:00",
                  "\tinet 169.254.3.7 netmask 0xffff0000 broadcast 169.254.255.255"]
        lines += [f"\tmember: {m} flags=3<LEARNING,DISCOVER>" for m in self.members]
        return "\n".join(lines + ["\tstatus: active"]) + "\n"

    def run(self, cmd: str, *, timeout: float = 30.0, stdin: bytes | None = None) -> CommandResult:
        if cmd == GATHER:
            mac = self.room.macs[self.name]
            return CommandResult(0, f"{MARK}uid\n501\n{MARK}sudo\nno\n{MARK}os\nDarwin\n{MARK}ifconfig\n"
                                    f"{self.ifconfig()}{MARK}ports\n{mac.hardware_ports()}\n"
                                    f"{MARK}thunderbolt\n{mac.thunderbolt(self.room)}\n", "")
        self.commands.append(cmd)
        self.stdins.append(stdin)
        argv = shlex.split(cmd)
        if argv[:2] != ["sudo", "-S"] or stdin != f"{PASSWORD}\n".encode():
            return CommandResult(1, "", "Sorry, try again.\nsudo: 1 incorrect password attempt\n")
        for line in argv[-1].removeprefix("set -e; ").split("; "):
            self.ifconfig_command(line.split())
        return CommandResult(0, "", "")

    def ifconfig_command(self, w: list[str]) -> None:
        assert w[0] == "ifconfig", w
        if w[2:3] == ["deletem"]:
            self.members.remove(w[3])
        elif w[2:3] == ["addm"]:
            self.members.append(w[3])
        elif w[2:] in (["down"], ["up"]):
            self.bridge_up = w[2] == "up"
        elif w[-1] == "alias":
            self.inet[w[1]].append((w[3], w[5]))
        elif w[-1] == "-alias":
            self.inet[w[1]] = [(ip, m) for ip, m in self.inet[w[1]] if ip != w[3]]
        else:
            raise AssertionError(w)


@pytest.fixture
def room(tmp_path: Path) -> tuple[Path, list[FakeMac]]:
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"defaults": {"user": "ada"}, "hosts": [{"name": "studio", "host": "192.168.1.20"},
                                                                        {"name": "mini", "host": "192.168.1.21"}]}))
    cabled = Room.of("studio", "mini").cable("studio", "mini")
    cabled.cable("studio", "mini")  # two cables between the same pair: each gets its own /30
    return path, [FakeMac("studio", 0, cabled), FakeMac("mini", 1, cabled)]


def run(path: Path, macs: list[FakeMac], mode: str, asked: list[list[str]], answer: str = PASSWORD) -> list[str]:
    lines: list[str] = []

    def ask(hosts: list[str]) -> str:
        asked.append(hosts)
        return answer

    setup_thunderbolt(path, load_hosts(path), macs, mode=mode, print_only=False, emit=lines.append,  # type: ignore[arg-type]
                      ask_password=ask)
    return lines


def test_two_macs_apply_once_then_nothing_then_undo_restores_the_bridge(room: tuple[Path, list[FakeMac]]) -> None:
    path, (studio, mini) = room
    asked: list[list[str]] = []
    printed: list[str] = []
    setup_thunderbolt(path, load_hosts(path), [studio, mini], mode="apply", print_only=True,  # type: ignore[arg-type]
                      emit=printed.append, ask_password=lambda hosts: pytest.fail("--print asks for nothing"))
    assert printed[printed.index("studio:"):printed.index("studio:") + 6] == [
        "studio:", "  sudo ifconfig bridge0 deletem en2", "  sudo ifconfig bridge0 deletem en3",
        "  sudo ifconfig bridge0 down", "  sudo ifconfig en2 inet 10.100.0.1 netmask 255.255.255.252 alias",
        "  sudo ifconfig en3 inet 10.100.0.5 netmask 255.255.255.252 alias"]
    assert studio.commands == [] and "fast_ips" not in path.read_text()
    out = run(path, [studio, mini], "apply", asked)
    assert asked == [["studio", "mini"]]  # one question for both Macs
    assert out[0] == "Thunderbolt cables (2, found by Thunderbolt UIDs):"
    assert out[1] == ("  studio en2 (Thunderbolt 1) 10.100.0.1/30  <->  mini en2 (Thunderbolt 1) 10.100.0.2/30"
                      "   [to add]")
    assert "done: 2 of 2 cables have their addresses" in out
    assert not studio.bridge_up and studio.members == ["en4", "en5"]
    assert studio.inet["en2"] == [("10.100.0.1", "255.255.255.252")] and mini.inet["en3"] == [
        ("10.100.0.6", "255.255.255.252")]
    assert all(PASSWORD not in c for c in studio.commands + mini.commands)  # on stdin, never in a command
    assert not any(PASSWORD in line for line in out)
    assert [h.fast_ips for h in load_hosts(path)] == [("10.100.0.1", "10.100.0.5"), ("10.100.0.2", "10.100.0.6")]

    sent = len(studio.commands)
    again = run(path, [studio, mini], "apply", asked)
    assert "nothing to change: every cable already has its address" in again and len(studio.commands) == sent
    assert asked == [["studio", "mini"]]  # nothing to do: no password asked

    undone = run(path, [studio, mini], "undo", asked)
    assert "undone: 10 changes on 2 hosts" in undone
    assert studio.bridge_up and sorted(studio.members) == studio.ports and studio.inet["en2"] == []
    assert "fast_ips" not in path.read_text() and "_thunderbolt" not in path.read_text()


def test_a_wrong_password_fails_with_one_line_per_host_and_records_nothing_unsafe(
        room: tuple[Path, list[FakeMac]]) -> None:
    path, macs = room
    with pytest.raises(HostError, match=r"setup-thunderbolt failed on 2 host\(s\): mini: sudo did not accept the "
                                        r"password; studio: sudo did not accept the password") as err:
        run(path, macs, "apply", [], answer="wrong")
    assert "wrong" not in str(err.value) and macs[0].bridge_up and macs[0].inet["en2"] == []
    assert "fast_ips" not in path.read_text()  # no address is there, so none is offered to the ring


def test_no_terminal_to_ask_on_stops_before_any_change(room: tuple[Path, list[FakeMac]]) -> None:
    path, macs = room

    def no_tty(hosts: list[str]) -> str:
        raise UsageError(f"sudo on {', '.join(hosts)} needs a password")

    with pytest.raises(UsageError, match="sudo on studio, mini needs a password"):
        setup_thunderbolt(path, load_hosts(path), macs, mode="apply", print_only=False,  # type: ignore[arg-type]
                          emit=lambda line: None, ask_password=no_tty)
    assert macs[0].commands == [] and re.search(r'"fast_ips"', path.read_text()) is None
