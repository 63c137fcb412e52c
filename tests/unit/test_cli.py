"""The `macrun` command line as a user meets it: error messages, exit codes, help, config commands, local runs.

Most cases go through Typer's CliRunner (the real app, in process: fast); the local runs start the real
console script, whose ranks are real processes running real mx.distributed collectives on this machine.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner, Result

from launcher.cli import app
from tests.lab.scripts.macrun_proc import MACRUN, SCRIPTS, run_macrun

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MACRUN_DEBUG", raising=False)  # it would turn errors into tracebacks
    monkeypatch.setenv("COLUMNS", "200")


def invoke(*args: str, cwd: Path | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> Result:
    if cwd is not None:
        assert monkeypatch is not None
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args))


def assert_user_error(result: Result, code: int, *needles: str) -> str:
    """Exit `code`, one `error:` line and one `hint:` line on stderr and nothing else, no traceback."""
    output = result.stdout + result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{output}"
    assert isinstance(result.exception, SystemExit | None), f"an exception escaped: {result.exception!r}"
    assert "Traceback" not in output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    assert len(lines[1]) > len("hint: ") + 10, "the hint must say something"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---- malformed hosts files ---------------------------------------------------------------------------

GOOD = '{"host": "studio.local"}'
# (id, file content, what the error line must name)
MALFORMED: list[tuple[str, str | bytes, str]] = [
    ("empty", "", "is empty"),
    ("not-json", '{"hosts": [' + GOOD + ",]}", "not valid JSON"),
    ("comment", '// my macs\n{"hosts": [' + GOOD + "]}", "not valid JSON"),
    ("not-utf8", b'{"hosts": [{"host": "caf\xe9"}]}', "not UTF-8"),
    ("top-level-string", '"studio.local"', 'must be an object with "hosts"'),
    ("hosts-missing", '{"defaults": {"user": "ada"}}', 'field "hosts" is missing'),
    ("hosts-empty", '{"hosts": []}', 'field "hosts"'),
    ("unknown-top-field", '{"hostz": [' + GOOD + "]}", 'unknown field "hostz"'),
    ("entry-not-object", '{"hosts": ["studio.local"]}', "hosts[0]"),
    ("host-and-ssh-missing", '{"hosts": [{"name": "studio"}]}', 'field "host"'),
    ("host-and-ssh-both", '{"hosts": [{"host": "a.local", "ssh": "a"}]}', 'field "ssh"'),
    ("unknown-entry-field", '{"hosts": [{"hostname": "a.local"}]}', 'unknown field "hostname"'),
    ("port-as-string", '{"hosts": [{"host": "a.local", "port": "22"}]}', 'field "port"'),
    ("port-out-of-range", '{"hosts": [{"host": "a.local", "port": 70000}]}', 'field "port"'),
    ("slots-zero", '{"hosts": [{"host": "a.local", "slots": 0}]}', 'field "slots"'),
    ("slots-bool", '{"hosts": [{"host": "a.local", "slots": true}]}', 'field "slots"'),
    ("user-in-host", '{"hosts": [{"host": "ada@a.local"}]}', 'field "host" must not contain a user'),
    ("port-in-host", '{"hosts": [{"host": "a.local:2222"}]}', 'field "host" must not contain a port'),
    ("ips-not-list", '{"hosts": [{"host": "a.local", "ips": "10.0.0.2"}]}', 'field "ips"'),
    ("ips-ipv6", '{"hosts": [{"host": "a.local", "ips": ["fe80::1"]}]}', 'field "ips"'),
    ("fast-ips-bad", '{"hosts": [{"host": "a.local", "fast_ips": ["10.0.0.300"]}]}', 'field "fast_ips"'),
    ("identity-file-missing", '{"hosts": [{"host": "a.local", "identity_file": "no_such_key"}]}',
     'field "identity_file"'),
    ("name-with-space", '{"hosts": [{"host": "a.local", "name": "my mac"}]}', 'field "name"'),
    ("duplicate-name", '{"hosts": [{"host": "a.local", "name": "x"}, {"host": "b.local", "name": "x"}]}',
     'field "name"'),
    ("same-machine-twice", '{"hosts": [{"host": "a.local", "name": "x"}, {"host": "a.local", "name": "y"}]}',
     "same machine"),
    ("field-twice", '{"hosts": [{"host": "a.local", "slots": 1, "slots": 2}]}', 'field "slots" is written twice'),
    ("default-not-allowed", '{"defaults": {"host": "a.local"}, "hosts": [' + GOOD + "]}",
     'field "host" cannot be a default'),
    ("defaults-not-object", '{"defaults": [], "hosts": [' + GOOD + "]}", "defaults"),
    ("labels-not-list", '{"hosts": [{"host": "a.local", "labels": "desk"}]}', 'field "labels"'),
    ("workdir-empty", '{"hosts": [{"host": "a.local", "workdir": ""}]}', 'field "workdir"'),
    ("mlx-entry-without-ssh", '[{"ips": ["10.0.0.2"]}]', 'field "ssh" is missing'),
]


@pytest.fixture(params=MALFORMED, ids=[case[0] for case in MALFORMED])
def bad_hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    _, content, needle = request.param
    path = tmp_path / "hosts.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    yield path, needle


def test_there_are_enough_malformed_cases() -> None:
    assert len(MALFORMED) >= 15 and len({c[0] for c in MALFORMED}) == len(MALFORMED)


def test_malformed_hosts_file_fails_macrun_run_with_one_error(bad_hosts: tuple[Path, str], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path, needle = bad_hosts
    result = invoke("run", "--hosts", str(path), "--", "python", "x.py", cwd=tmp_path, monkeypatch=monkeypatch)
    line = assert_user_error(result, 2, str(path), needle)
    assert "[rank" not in result.stdout and not (tmp_path / "runs").exists(), f"something started: {line}"


def test_malformed_hosts_file_fails_hosts_check_with_one_error(bad_hosts: tuple[Path, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, needle = bad_hosts
    result = invoke("hosts", "check", "--hosts", str(path), cwd=tmp_path, monkeypatch=monkeypatch)
    assert_user_error(result, 2, str(path), needle)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_hosts_path_that_is_not_a_file(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hosts.json"
    if kind == "directory":
        path.mkdir()
    result = invoke("run", "--hosts", str(path), "--", "python", "x.py", cwd=tmp_path, monkeypatch=monkeypatch)
    assert_user_error(result, 2, str(path), "not found" if kind == "missing" else "is a directory")


# ---- help ---------------------------------------------------------------------------------------------

def _commands() -> list[tuple[list[str], Any]]:
    """Every command and subcommand of the app, as (path, click command); typer vendors its own click."""
    found: list[tuple[list[str], Any]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        found.append((path, cmd))
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


COMMANDS = _commands()


def test_every_command_is_reachable() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train", "run", "hosts", "hosts check", "hosts trust", "config", "config show", "config keys"} <= names


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=[" ".join(p) or "macrun" for p, _ in COMMANDS])
def test_help_of_every_command_describes_it_and_its_options(path: list[str], cmd: Any) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.stdout + result.stderr
    text = result.stdout
    assert "Usage: macrun" in text and " ".join(path) in text
    assert cmd.help and cmd.help.split("\n")[0].strip().split()[0] in text, "its own description is shown"
    for param in cmd.params:
        if param.param_type_name == "option":
            long = max(param.opts, key=len)
            assert long in text, f"{long} is not shown in `macrun {' '.join(path)} --help`"
            assert param.help, f"{long} of `macrun {' '.join(path)}` has no help text"
        else:
            assert param.name and param.name.lower() in text.lower(), f"argument {param.name} is not shown"
            assert getattr(param, "help", None), f"argument {param.name} has no help text"
    for name in getattr(cmd, "commands", {}):
        assert name in text, f"subcommand {name} is not listed"


def test_macrun_without_arguments_shows_help() -> None:
    result = invoke()
    text = result.stdout + result.stderr
    assert "Usage: macrun" in text
    for name in ("train", "run", "hosts", "config"):
        assert name in text
    assert "Traceback" not in text


# ---- config and the command line -------------------------------------------------------------------------

def test_train_with_an_unknown_config_key_suggests_the_nearest(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  stpes: 3\n")
    result = invoke("train", str(config), cwd=tmp_path, monkeypatch=monkeypatch)
    line = assert_user_error(result, 2, "train.stpes")
    assert "train.steps" in result.stderr.splitlines()[1], "the hint names the nearest key"
    assert str(config) in line
    assert not (tmp_path / "runs").exists(), "nothing may be prepared for a bad config"


def test_train_with_an_unknown_override_suggests_the_nearest(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("train", str(QUICKSTART), "--set", "model.sise=tiny", cwd=tmp_path, monkeypatch=monkeypatch)
    assert_user_error(result, 2, "model.sise")
    assert "model.size" in result.stderr


def test_train_with_a_missing_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke("train", "nope.yaml", cwd=tmp_path, monkeypatch=monkeypatch)
    assert_user_error(result, 2, "nope.yaml", "not found")


@pytest.mark.parametrize("args", [["run"], ["run", "--"], ["run", "--nproc", "2", "--"]],
                         ids=["bare", "dashes", "nproc"])
def test_run_without_a_command_is_a_usage_error(args: list[str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    result = invoke(*args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert_user_error(result, 2, "no command")
    assert "-- python" in result.stderr.splitlines()[1], "the hint shows where the command goes"


def test_config_keys_lists_every_section() -> None:
    result = invoke("config", "keys")
    assert result.exit_code == 0, result.stderr
    for key in ("run.name", "model.size", "data.seq_len", "train.steps", "train.lr", "strategy.mode"):
        assert key in result.stdout, f"{key} missing from `macrun config keys`"


def test_config_show_prints_yaml_with_the_override_applied() -> None:
    result = invoke("config", "show", str(QUICKSTART), "--set", "train.steps=7", "-s", "model.size=tiny")
    assert result.exit_code == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    original = yaml.safe_load(QUICKSTART.read_text())
    assert shown["train"]["steps"] == 7 and shown["model"]["size"] == "tiny"
    assert shown["train"]["lr"] == original["train"]["lr"], "keys not overridden keep the file's value"
    assert shown["run"]["name"] == original["run"]["name"]


# ---- local runs through the real console script ---------------------------------------------------------

@pytest.mark.timeout(60)
def test_local_run_of_an_unmodified_mlx_script(tmp_path: Path) -> None:
    proc = run_macrun(["run", "--nproc", "3", "--", "python", str(SCRIPTS / "allsum.py")], home=None, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(3):
        assert f"[rank {rank} localhost] world=3 rank={rank} sum=6 gather=[0, 1, 2]" in proc.stdout, proc.stdout
        assert (tmp_path / "runs" / "run" / "logs" / f"rank-{rank}.log").is_file()
    assert proc.stderr.strip() == "", proc.stderr


@pytest.mark.timeout(60)
def test_local_rank_exit_3_fails_the_run_with_a_table(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['RANK'])\n"
        "print(f'rank {rank} up', flush=True)\n"
        "if rank == 1:\n"
        "    print('giving up on purpose', file=sys.stderr, flush=True)\n"
        "    sys.exit(3)\n"
        "time.sleep(30)\n")
    proc = run_macrun(["run", "--nproc", "3", "--", "python", str(script)], home=None, cwd=tmp_path, timeout=45)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    rows = [line for line in proc.stderr.splitlines() if line.lstrip("│┃ ").startswith(("0 ", "1 ", "2 "))]
    assert len(rows) == 3 and rows[0].lstrip("│┃ ").startswith("1 "), f"root cause first:\n{proc.stderr}"
    assert "failed" in rows[0] and "exit code 3" in rows[0], proc.stderr
    assert "giving up on purpose" in proc.stderr, "the failing rank's last lines are shown"
    assert "[macrun] rank 1 (localhost) failed" in proc.stdout


def test_module_help_is_runnable_as_a_console_script() -> None:
    proc = subprocess.run([MACRUN, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Usage: macrun" in proc.stdout, proc.stderr
