"""What a user sees when a host cannot be used: one `error:` line, one `hint:` line, exit 3, nothing started.

Each case breaks one thing a real room of Macs gets wrong (a host key, a key file, an address, the
Python on a host) and runs the real `macrun run` against the lab. Besides the message, each test proves
that no rank ever started: the rank script (tests/lab/scripts/mark_started.py) leaves a file per rank in
a folder under /tmp, which the hosts share with this machine, and none appears; no `[rank` output, no
log folder, and no process left on any host.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.labnet import Lab, wait_until
from tests.lab.scripts.macrun_proc import SCRIPTS, assert_one_error, run_macrun

pytestmark = pytest.mark.timeout(60)

UNREACHABLE_S = 10.0  # the bound for a lab address with nothing behind it


def run_job(lab: Lab, tmp_path: Path, hosts: Path, name: str, *, home: Path | None = None,
            extra: tuple[str, ...] = (), script: str = "mark_started.py") -> subprocess.CompletedProcess[str]:
    """`macrun run` of a script on the lab; mark_started.py leaves a file per rank in tmp_path/started."""
    wait_until(lambda: all(lab.stray_pids(h) == [] for h in lab.hosts), 5, "the hosts to be clean before the run")
    started = tmp_path / "started"
    started.mkdir(exist_ok=True)
    args = [str(started)] if script == "mark_started.py" else []
    return run_macrun(["run", "--hosts", str(hosts), "--name", name, *extra, "--",
                       "python", str(SCRIPTS / script), *args], home=home or lab.ssh_home, cwd=tmp_path)


def assert_nothing_started(lab: Lab, tmp_path: Path, proc: subprocess.CompletedProcess[str], name: str) -> None:
    """No rank ran: none left its mark (/tmp is shared with the hosts), none printed, none was logged."""
    assert sorted(p.name for p in (tmp_path / "started").iterdir()) == [], "a rank was started"
    out = proc.stdout + proc.stderr
    assert "[rank " not in out and "starting" not in out, out
    assert not (tmp_path / "runs" / name / "logs").exists(), "the job was started"
    wait_until(lambda: all(lab.stray_pids(h) == [] for h in lab.hosts), 5, "the hosts to be left clean")


def names_hosts(error: str, *hosts: str) -> set[str]:
    """Which of `hosts` the error names as a word: not inside a path or a key's fingerprint, where random
    base64 can spell "h0" (a run failed on "...Bcieh0nl..." in a fingerprint)."""
    words = re.sub(r"SHA256:\S+|\S*/\S*", " ", error)
    return {h for h in hosts if re.search(rf"(?<![\w+/=]){re.escape(h)}(?![\w+/=])", words)}


def copy_home(lab: Lab, dest: Path, *, with_key: bool = True) -> Path:
    """A copy of the lab's ssh home that a test may change (the session's own stays intact)."""
    shutil.copytree(lab.ssh_home, dest, symlinks=True)
    if not with_key:
        for key in (dest / ".ssh").glob("id_*"):
            key.unlink()
    return dest


def edit_host(path: Path, index: int, **fields: object) -> Path:
    data = json.loads(path.read_text())
    data["hosts"][index].update(fields)
    path.write_text(json.dumps(data))
    return path


def test_a_changed_host_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    home = copy_home(lab, tmp_path / "home")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    h1 = lab.host("h1")
    known = home / ".ssh" / "known_hosts"
    lines = [ln for ln in known.read_text().splitlines() if not ln.startswith(f"{h1.wifi_ip} ")]
    lines.append(f"{h1.wifi_ip} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}")
    known.write_text("\n".join(lines) + "\n")
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    proc = run_job(lab, tmp_path, hosts, "wrongkey", home=home)
    error = assert_one_error(proc, 3, "h1", "CHANGED")
    assert not names_hosts(error, "h0", "h2"), "only the host whose key changed is named"
    assert "ssh-keygen -R" in proc.stderr
    assert_nothing_started(lab, tmp_path, proc, "wrongkey")


def test_an_unknown_host_key_is_refused_until_accepted(lab: Lab, tmp_path: Path) -> None:
    home = copy_home(lab, tmp_path / "home")
    known = home / ".ssh" / "known_hosts"
    known.write_text("")
    hosts = lab.write_hosts_file(tmp_path / "hosts.json")
    proc = run_job(lab, tmp_path, hosts, "newkey", home=home)
    assert_one_error(proc, 3, "not known", "SHA256:", "h0", "h1", "h2")
    assert "macrun hosts trust" in proc.stderr
    assert known.read_text() == "", "a refused key must not be recorded"
    assert_nothing_started(lab, tmp_path, proc, "newkey")

    proc = run_job(lab, tmp_path, hosts, "newkey", home=home, extra=("--accept-new-host-keys",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The marks that assert_nothing_started looks for do appear when ranks run.
    assert sorted(p.name for p in (tmp_path / "started").iterdir()) == ["rank-0", "rank-1", "rank-2"]
    wifi = {h.wifi_ip for h in lab.hosts}
    real_keys = {line for line in lab.known_hosts_lines() if line.split()[0] in wifi}
    assert set(known.read_text().splitlines()) == real_keys, "exactly the hosts' real keys are recorded"
    check = run_macrun(["hosts", "check", "--hosts", str(hosts)], home=home, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr  # now known: no flag needed


def test_an_address_with_nothing_behind_it_fails_fast(lab: Lab, tmp_path: Path) -> None:
    taken = {lab.master_ip, *(h.wifi_ip for h in lab.hosts)}
    nobody = f"{lab.subnet}.0.99"
    assert nobody not in taken
    hosts = edit_host(lab.write_hosts_file(tmp_path / "hosts.json"), 1, host=nobody)
    started = time.monotonic()
    proc = run_job(lab, tmp_path, hosts, "unreachable")
    took = time.monotonic() - started
    assert_one_error(proc, 3, "h1", nobody, "cannot reach")
    assert took < UNREACHABLE_S, f"took {took:.1f} s to give up on {nobody}"
    assert_nothing_started(lab, tmp_path, proc, "unreachable")


def test_a_bad_key_file_is_named(lab: Lab, tmp_path: Path) -> None:
    home = copy_home(lab, tmp_path / "home", with_key=False)  # the lab key must not rescue the login
    garbage = tmp_path / "garbage_key"
    garbage.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    hosts = lab.write_hosts_file(tmp_path / "hosts.json", identity_file=str(lab.client_key))
    edit_host(hosts, 1, identity_file=str(garbage))
    proc = run_job(lab, tmp_path, hosts, "badkey", home=home)
    error = assert_one_error(proc, 3, "h1", str(garbage))
    assert not names_hosts(error, "h0", "h2"), "the other hosts log in with the good key"
    assert_nothing_started(lab, tmp_path, proc, "badkey")


def python_without_mlx(lab: Lab) -> str:
    """An interpreter that runs on the hosts but has no MLX: this venv's base Python."""
    base = getattr(sys, "_base_executable", "") or ""
    for candidate in (base, "/root/.pyenv/versions/3.11.7/bin/python3"):
        if not candidate or not Path(candidate).exists():
            continue
        check = lab.exec(lab.host("h1"), [candidate, "-c", "import importlib.util as u, sys; "
                                          "sys.exit(0 if u.find_spec('mlx') is None else 1)"])
        if check.returncode == 0:
            return candidate
    pytest.skip("no Python without MLX that runs on the lab hosts")


def test_a_host_without_mlx_is_named_with_the_install_command(lab: Lab, tmp_path: Path) -> None:
    python = python_without_mlx(lab)
    hosts = edit_host(lab.write_hosts_file(tmp_path / "hosts.json"), 1, python=python)
    proc = run_job(lab, tmp_path, hosts, "nomlx")
    error = assert_one_error(proc, 3, "MLX does not import on h1", python)
    assert not names_hosts(error, "h0", "h2"), error
    _, hint = proc.stderr.rsplit("hint:", 1)
    assert "pip install 'mlx[cpu]==" in hint and python in hint, hint
    assert_nothing_started(lab, tmp_path, proc, "nomlx")


def fake_mlx_python(lab: Lab, where: Path, version: str) -> Path:
    """A "python" for a host: its real interpreter, with a stand-in `mlx` of `version` first on the path."""
    package = where / "fake_mlx" / "mlx"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (package / "core.py").write_text(f'__version__ = "{version}"\n\n\ndef default_device():\n'
                                     '    return "Device(cpu, 0)"\n')
    wrapper = where / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={package.parent}${{PYTHONPATH:+:$PYTHONPATH}} '
                       f'exec {lab.hosts[2].python} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_mismatched_mlx_versions_are_refused(lab: Lab, tmp_path: Path) -> None:
    fake = fake_mlx_python(lab, tmp_path / "h2py", "0.1.0")
    real = lab.exec(lab.host("h0"), [lab.hosts[0].python, "-c", "import mlx.core as mx; print(mx.__version__)"])
    assert real.returncode == 0, real.stderr
    real_version = real.stdout.strip()
    hosts = edit_host(lab.write_hosts_file(tmp_path / "hosts.json"), 2, python=str(fake))
    proc = run_job(lab, tmp_path, hosts, "mismatch")
    assert_one_error(proc, 3, "MLX versions differ", f"h0 {real_version}", f"h1 {real_version}", "h2 0.1.0")
    _, hint = proc.stderr.rsplit("hint:", 1)
    assert f"mlx=={real_version}" in hint and f"'mlx[cpu]=={real_version}'" in hint, hint
    assert_nothing_started(lab, tmp_path, proc, "mismatch")
