"""Hostile input through the real `macrun` command: a binary file, YAML or JSON nested thousands deep, numbers of
thousands of digits. Each is one `error:` line naming the file (and key) and one `hint:` line, exit 2, never a
traceback (before the fix: RecursionError, UnicodeDecodeError or Python's int-digit ValueError, exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MACRUN = str(Path(sys.executable).with_name("macrun"))  # the console script of this very environment
DEEP_YAML = "[" * 5000
DEEP_JSON = "[" * 100_000 + "]" * 100_000
LONG = "9" * 5001  # past Python's 4,300-digit int/str conversion limit


def macrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MACRUN_DEBUG", "SSH_AUTH_SOCK")}
    env.update(HOME=str(cwd), COLUMNS="200")
    return subprocess.run([MACRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def assert_one_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, stderr exactly `error: ...` and `hint: ...`, no traceback; every needle in the error line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}, wanted 2:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), proc.stderr
    assert len(lines[0]) < 200, "one readable line, not the input echoed back"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01" + bytes(range(256))


@pytest.mark.parametrize(("content", "needles"), [
    (PNG, ["not a text file", "0x89"]),
    (bytes(range(255, -1, -1)) * 8, ["not a text file"]),
    (b"run:\n  name: a\x00b\n", ["not valid YAML", "U+0000"]),
    (DEEP_YAML.encode(), ["nested too deeply"]),
    (f"run:\n  seed: {LONG}\n".encode(), ["run.seed", "5,001-digit number", "too large"]),
    (f"train:\n  steps: 0x{'f' * 5000}\n".encode(), ["train.steps", "too large"]),
    (f"run:\n  name: [0x{'f' * 5000}]\n".encode(), ["run.name", "expected str"]),
], ids=["png", "random-bytes", "nul-byte", "yaml-5000-deep", "int-5001-digits", "hex-20000-bits", "huge-in-list"])
def test_config_show_rejects_a_hostile_config_file(tmp_path: Path, content: bytes, needles: list[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    assert_one_error(macrun(["config", "show", str(path)], tmp_path), str(path), *needles)


def test_train_rejects_a_binary_config_before_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    assert_one_error(macrun(["train", str(path)], tmp_path), str(path), "not a text file")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("override", "needles"), [
    (f"train.steps={DEEP_YAML}", ["--set train.steps", "nested too deeply"]),
    (f"train.steps={LONG}", ["train.steps", "5,001-digit number"]),
    (f"run.seed=-0x{'f' * 5000}", ["run.seed", "too large"]),
    ("run.name=../../etc", ["run.name", "not a path"]),
], ids=["yaml-5000-deep", "int-5001-digits", "negative-hex", "name-is-a-path"])
def test_config_show_rejects_a_hostile_override(tmp_path: Path, override: str, needles: list[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  steps: 10\n")
    assert_one_error(macrun(["config", "show", str(path), "--set", override], tmp_path), *needles)


@pytest.mark.parametrize(("content", "needles"), [
    (DEEP_JSON, ["nested too deeply"]),
    ('{"hosts": [' + "[" * 900 + "]" * 900 + "]}", ["hosts[0]", "must be an object"]),
    ('{"hosts": [{"host": "a.local", "port": ' + LONG + "}]}", ['field "port"', "5,001-digit number"]),
    ('[{"ssh": "a.local", "ips": [' + LONG + "]}]", ['field "ips"', "5,001-digit number"]),
], ids=["json-100000-deep", "entry-900-deep", "port-5001-digits", "mlx-ips-5001-digits"])
def test_hosts_check_rejects_a_hostile_hosts_file_before_connecting(tmp_path: Path, content: str,
                                                                    needles: list[str]) -> None:
    path = tmp_path / "hosts.json"
    path.write_text(content)
    assert_one_error(macrun(["hosts", "check", "--hosts", str(path)], tmp_path), str(path), *needles)
