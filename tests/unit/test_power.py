"""Awake and powered Macs: `pmset -g batt` parsing, the min_battery verdict, and when ranks run under caffeinate."""

from __future__ import annotations

import shutil
import stat
import sys
from pathlib import Path

import pytest

from distributed import probe
from distributed.rankshim import _keep_awake_argv

# Recorded `pmset -g batt` output, one per state a MacBook reports (ids as macOS prints them).
PMSET_AC_CHARGED = ("Now drawing from 'AC Power'\n"
                    " -InternalBattery-0 (id=4653155)\t100%; charged; 0:00 remaining present: true\n")
PMSET_DISCHARGING = ("Now drawing from 'Battery Power'\n"
                     " -InternalBattery-0 (id=4653155)\t47%; discharging; 3:12 remaining present: true\n")
PMSET_CHARGING = ("Now drawing from 'AC Power'\n"
                  " -InternalBattery-0 (id=4653155)\t63%; charging; 1:05 remaining present: true\n")
PMSET_NOT_CHARGING = ("Now drawing from 'AC Power'\n"
                      " -InternalBattery-0 (id=4653155)\t80%; AC attached; not charging present: true\n")
PMSET_LOW_NO_ESTIMATE = ("Now drawing from 'Battery Power'\n"
                         " -InternalBattery-0 (id=4653155)\t12%; discharging; (no estimate) present: true\n")
PMSET_FINISHING = ("Now drawing from 'AC Power'\n"
                   " -InternalBattery-0 (id=4653155)\t98%; finishing charge; 0:04 remaining present: true\n")
PMSET_NO_BATTERY = "Now drawing from 'AC Power'\n"  # Mac Studio, Mac mini
CAT = shutil.which("cat") or "/bin/cat"  # by path: the fake pmset runs with only its own folder on PATH


# ---- parse_pmset ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    (PMSET_AC_CHARGED, {"percent": 100, "on_ac": True, "state": "charged"}),
    (PMSET_DISCHARGING, {"percent": 47, "on_ac": False, "state": "discharging"}),
    (PMSET_CHARGING, {"percent": 63, "on_ac": True, "state": "charging"}),
    (PMSET_NOT_CHARGING, {"percent": 80, "on_ac": True, "state": "not charging"}),
    (PMSET_LOW_NO_ESTIMATE, {"percent": 12, "on_ac": False, "state": "discharging"}),
    (PMSET_FINISHING, {"percent": 98, "on_ac": True, "state": "finishing charge"}),
], ids=["ac-charged", "discharging", "charging", "not-charging", "no-estimate", "finishing"])
def test_parse_pmset_reads_percent_source_and_state(text: str, expected: dict[str, object]) -> None:
    assert probe.parse_pmset(text) == expected


def test_parse_pmset_without_a_battery_is_none() -> None:
    assert probe.parse_pmset(PMSET_NO_BATTERY) is None


@pytest.mark.parametrize("text", [
    "", "\n", "garbage", "pmset: command not found\n", "-InternalBattery-0\tlots%; charged\n",
    "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1)\n",
])
def test_parse_pmset_on_garbage_is_none_never_an_exception(text: str) -> None:
    assert probe.parse_pmset(text) is None


def test_parse_pmset_keeps_the_percent_when_the_state_is_worded_otherwise() -> None:
    text = "Now drawing from 'AC Power'\n -InternalBattery-0 (id=1)\t55%; some new word; present: true\n"
    assert probe.parse_pmset(text) == {"percent": 55, "on_ac": True, "state": None}


def test_parse_power_supply_reports_the_same_states_on_linux() -> None:
    laptop = {"BAT0": {"type": "Battery", "capacity": "100", "status": "Full"},
              "AC": {"type": "Mains", "online": "1"}}
    assert probe.parse_power_supply(laptop) == {"percent": 100, "on_ac": True, "state": "charged"}


# ---- battery_problem --------------------------------------------------------------------------------

def test_battery_problem_on_battery_below_the_minimum() -> None:
    battery = probe.parse_pmset(PMSET_LOW_NO_ESTIMATE)
    assert probe.battery_problem(battery, 20.0) == "on battery at 12% (below fault.min_battery 20%)"
    assert probe.battery_problem(battery, 12.5) == "on battery at 12% (below fault.min_battery 12.5%)"


@pytest.mark.parametrize(("text", "min_percent"), [
    (PMSET_DISCHARGING, 20.0),  # on battery, above the minimum
    (PMSET_DISCHARGING, 47.0),  # at the minimum is not below it
    (PMSET_LOW_NO_ESTIMATE, 0.0),  # the user allowed any charge
    (PMSET_AC_CHARGED, 100.0),  # on AC
    (PMSET_NOT_CHARGING, 90.0),  # on AC, held at 80% by optimised charging
    (PMSET_NO_BATTERY, 20.0),  # a desktop Mac
])
def test_battery_problem_is_none_otherwise(text: str, min_percent: float) -> None:
    assert probe.battery_problem(probe.parse_pmset(text), min_percent) is None


def test_battery_problem_tolerates_partial_facts() -> None:
    assert probe.battery_problem({"percent": None, "on_ac": False}, 20.0) is None
    assert probe.battery_problem({"percent": 5, "on_ac": None}, 20.0) is None
    assert probe.battery_problem({}, 20.0) is None


# ---- read_battery -----------------------------------------------------------------------------------

def fake_pmset(bin_dir: Path, script: str) -> None:
    """Put a `pmset` that runs `script` (sh) first on PATH."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "pmset"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def on_darwin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pretend to be macOS with only tmp_path/bin on PATH; return that folder for a fake pmset."""
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return tmp_path / "bin"


def test_read_battery_runs_pmset_on_macos(on_darwin: Path, tmp_path: Path) -> None:
    (tmp_path / "batt.txt").write_text(PMSET_CHARGING)
    fake_pmset(on_darwin, f'[ "$*" = "-g batt" ] && exec {CAT} {tmp_path / "batt.txt"}\nexit 1\n')
    assert probe.read_battery() == {"percent": 63, "on_ac": True, "state": "charging"}


@pytest.mark.parametrize("script", [
    "echo 'pmset: unknown option' >&2\nexit 1\n",
    "printf '\\377\\376 garbage'\n",
], ids=["fails", "garbage"])
def test_read_battery_is_none_when_pmset_fails(on_darwin: Path, script: str) -> None:
    fake_pmset(on_darwin, script)
    assert probe.read_battery() is None


def test_read_battery_is_none_without_pmset(on_darwin: Path) -> None:
    assert probe.read_battery() is None


@pytest.mark.timeout(10)
def test_read_battery_gives_up_on_a_hung_pmset(on_darwin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "BATTERY_TIMEOUT_S", 0.2)
    fake_pmset(on_darwin, "exec sleep 30\n")
    assert probe.read_battery() is None


def test_read_battery_is_none_off_macos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    fake_pmset(tmp_path / "bin", "exit 99\n")  # present, yet never run
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert probe.read_battery() is None


# ---- caffeinate for ranks ---------------------------------------------------------------------------

def test_ranks_run_under_caffeinate_on_macos_only_by_default() -> None:
    assert _keep_awake_argv("darwin", 4242) == ["caffeinate", "-i", "-s", "-w", "4242"]
    assert _keep_awake_argv("linux", 4242) is None


@pytest.mark.parametrize(("platform", "setting", "on"), [
    ("linux", "1", True), ("darwin", "0", False), ("darwin", "", True), ("linux", "yes", False),
])
def test_macrun_caffeinate_forces_it_on_or_off(platform: str, setting: str, on: bool) -> None:
    argv = _keep_awake_argv(platform, 7, setting)
    assert (argv == ["caffeinate", "-i", "-s", "-w", "7"]) if on else argv is None
