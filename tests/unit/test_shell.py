"""launcher/transport/shell.py: what reaches a host's shell; each rule checked by running the words in a real `sh`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from distributed.errors import ConfigError
from launcher.transport.ranks import RankSpec, SSHLauncher, shim_request
from launcher.transport.shell import check_env_names, env_exports, expand_home, shell_path

NASTY = "a b'c \"d\" $HOME `id` $(id) ; & | * ~ \\ \n end"


def sh(script: str, home: Path) -> str:
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    return done.stdout


def rank(env: dict[str, str], python: str = "python3") -> RankSpec:
    return RankSpec(rank=0, host_name="h", local_rank=0, argv=[python, "-c", "pass"], env=env, cwd="/tmp",
                    python=python)


@pytest.mark.parametrize("name", ["A", "_x", "MLX_RANK", "a1_B2"])
def test_valid_env_names_pass(name: str) -> None:
    check_env_names({name: "v"})


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=B", "A;touch x", "$(id)", "É", "A\nB"])
def test_invalid_env_names_are_refused_naming_them(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        env_exports({"GOOD": "1", name: "v"})
    assert repr(name) in err.value.message and "\n" not in err.value.message
    assert "letters, digits and _" in (err.value.hint or "")
    with pytest.raises(ConfigError, match="is not valid"):
        shim_request(rank({name: "v"}), grace=1.0)  # rank env goes to the shim as JSON: same rule


def test_env_values_are_quoted(tmp_path: Path) -> None:
    (tmp_path / "marker").write_text("")
    env = {"A": NASTY, "B": "", "C": "*"}
    out = sh(env_exports(env) + 'printf "%s|%s|%s" "$A" "$B" "$C"', tmp_path)
    assert out == f"{NASTY}||*"
    assert env_exports({}) == "" and env_exports(None) == ""


def test_shell_path_expands_only_a_leading_home(tmp_path: Path) -> None:
    weird = tmp_path / "my dir $x"
    weird.mkdir()
    assert sh(f"cd {shell_path('~/my dir $x')} && pwd", tmp_path).strip() == str(weird)
    assert sh(f"printf %s {shell_path('~')}", tmp_path) == str(tmp_path)
    assert sh(f"printf %s {shell_path('~/')}", tmp_path) == f"{tmp_path}/"
    for literal in ("/opt/a b/~/c", "~other/x", "x~", "$HOME/x", "a'b"):
        assert sh(f"printf %s {shell_path(literal)}", tmp_path) == literal


def test_expand_home() -> None:
    assert expand_home("~/mlx/bin/python", "/Users/ada") == "/Users/ada/mlx/bin/python"
    assert expand_home("~", "/Users/ada") == "/Users/ada"
    assert expand_home("python3", "/Users/ada") == "python3"
    assert expand_home("~ada/x", "/Users/ada") == "~ada/x"


def test_rank_command_expands_home_in_python_and_workdir(tmp_path: Path) -> None:
    (tmp_path / "w d").mkdir()
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "ran $0 in $PWD with $*"\n')
    python.chmod(0o700)
    command = SSHLauncher(None, "~/w d").command(rank({}, "~/venv/bin/python"))  # type: ignore[arg-type]
    assert sh(command, tmp_path).strip() == f"ran {python} in {tmp_path}/w d with -u -m distributed.rankshim"
