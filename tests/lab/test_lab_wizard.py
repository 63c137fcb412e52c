"""The wizard, driven in a real terminal (tmux) against the lab: mDNS discovery, checks, model, plan, launch.

Every test runs `python wizard.py` in a private tmux server (its own socket) with HOME = the lab's ssh home,
cwd = a temp dir holding a copy of configs/, and mDNS bound to the lab's master address. Each screen the
test looks at is saved under the test's tmp dir and copied to /tmp/wizard-screens/ (for the notes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.room.discovery import browse
from launcher.views.plan import list_models
from tests.lab.labnet import Lab

ROOT = Path(__file__).resolve().parents[2]
WIZARD = ROOT / "wizard.py"
SCREENS = Path("/tmp/wizard-screens")
TINY = ["model.size=tiny", "data.max_bytes=200000", "data.seq_len=32", "train.steps=20", "train.eval_interval=10",
        "train.checkpoint_interval=20", "train.log_interval=10"]

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """`python wizard.py ARGS` in a detached tmux session of its own; read the screen, type keys."""

    def __init__(self, name: str, cwd: Path, args: list[str], env: dict[str, str], screens: Path) -> None:
        self.name = name
        self.screens = screens
        self.count = 0
        self.socket = str(cwd.parent / f"{name}.tmux")
        self.status_file = cwd.parent / f"{name}.status"
        conf = cwd.parent / f"{name}.tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 20000\nset -g status off\n")
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        wizard = f"env {exports} {shlex.quote(sys.executable)} {shlex.quote(str(WIZARD))} {shlex.join(args)}"
        # tmux 3.3 sometimes leaves its pane's process unreaped (no exit status), so the shell records the
        # status. `trap :` keeps that shell alive through Ctrl-C without passing "ignore SIGINT" on to Python.
        command = f"trap : INT; {wizard}; s=$?; echo $s > {shlex.quote(str(self.status_file))}; exit $s"
        self._tmux("-f", str(conf), "new-session", "-d", "-s", "wiz", "-x", "160", "-y", "60", "-c", str(cwd),
                   "sh", "-c", command)

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise RuntimeError(f"tmux {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def text(self) -> str:
        """Everything the terminal showed so far (history and screen), wrapped lines joined."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "wiz")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "wiz")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """Poll the terminal until `pattern` (a regex) shows; fail with the screen if it does not in time."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if re.search(pattern, text):
                return text
            if self.exit_status() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} did not appear; the terminal shows:\n{text}")
            time.sleep(0.05)  # polling interval of a deadline loop

    def exit_status(self) -> int | None:
        """The wizard's exit status, None while it runs."""
        text = self.status_file.read_text() if self.status_file.exists() else ""
        return int(text) if text.endswith("\n") else None

    def wait_exit(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while (status := self.exit_status()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the wizard did not exit in {timeout} s:\n{self.text()}")
            time.sleep(0.05)  # polling interval of a deadline loop
        return status

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "wiz", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "wiz", "-l", text)

    def save(self, label: str, *, full: bool = False) -> str:
        """Save the visible screen (or everything, `full`) as NN-label.txt here and in /tmp/wizard-screens."""
        self.count += 1
        text = self.text() if full else self.screen()
        name = f"{self.name}-{self.count:02d}-{label}.txt"
        for folder in (self.screens, SCREENS):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text.rstrip() + "\n")
        return text

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10)
        Path(self.socket).unlink(missing_ok=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """An empty folder to run the wizard in, holding a copy of configs/ (as a user's checkout would)."""
    cwd = tmp_path / "work"
    shutil.copytree(ROOT / "configs", cwd / "configs")
    return cwd


@pytest.fixture
def term(lab: Lab, workspace: Path, tmp_path: Path) -> Iterator[object]:
    """A factory: term(name, args, home=..., mdns=...) starts the wizard; every terminal is closed after."""
    started: list[Terminal] = []

    def start(name: str, args: list[str], *, home: Path | None = None, mdns: str | None = None) -> Terminal:
        env = {"HOME": str(home or lab.ssh_home), "MACRUN_MDNS_INTERFACES": mdns or lab.master_ip,
               "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color", "COLUMNS": "160"}
        terminal = Terminal(name, workspace, args, env, tmp_path / "screens")
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.close()


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under `roots` with its content: "nothing written" means this does not change."""
    files: dict[str, bytes] = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files.update({str(p): p.read_bytes() for p in paths})
    return files


def hosts_file(lab: Lab, path: Path, indices: list[int], *, python: bool = True, **extra: object) -> Path:
    entries = []
    for i in indices:
        h = lab.hosts[i]
        entry: dict[str, object] = {"name": h.name, "host": h.wifi_ip}
        if python:
            entry["python"] = h.python
        entries.append(entry)
    data: dict[str, object] = {"hosts": entries, **extra}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


# ---- mDNS on its own -----------------------------------------------------------------------------------------
def test_browse_finds_every_lab_host_with_its_model(lab: Lab) -> None:
    found = browse(2.0, interfaces=[lab.master_ip])
    by_address = {h.address: h for h in found}
    for host in lab.hosts:
        seen = by_address.get(host.wifi_ip)
        assert seen is not None, f"{host.mdns_name} not found over mDNS: {found}"
        assert (seen.name, seen.port, seen.model, seen.source) == (host.mdns_name, 22, "Mac16,10", "mDNS")


# ---- the whole flow ------------------------------------------------------------------------------------------
def test_wizard_discovers_selects_two_and_trains_to_a_checkpoint(lab: Lab, term, workspace: Path) -> None:
    args = ["--mdns-timeout", "2"] + [a for kv in TINY + ["run.name=wizard-lab"] for a in ("--set", kv)]
    t = term("flow", args)
    names = [h.mdns_name for h in lab.hosts]
    t.wait_for(r"Which machines should train\?.*\n(.*\n)*.*" + re.escape(names[2]))
    screen = t.save("machines")
    for host in lab.hosts:  # all three found over mDNS, with the model their _device-info announces
        assert re.search(rf"{re.escape(host.mdns_name)}\s+│\s+{re.escape(host.wifi_ip)}\s+│\s+"
                         r"Mac mini \(M4, 2024\) · Mac16,10\s+│\s+mDNS",
                         screen), screen
    t.keys("Down", "Down", "Space", "Enter")  # untick the third

    # The hosts' python3 has no MLX (like a Mac's /usr/bin/python3): the wizard says so and asks for one.
    t.wait_for(r"Which Python has MLX on")
    screen = t.save("check-no-mlx")
    assert "not ready" in screen and "MLX does not import" in screen
    t.type(lab.hosts[0].python)
    t.keys("Enter")

    t.wait_for(r"Which model\?")
    screen = t.save("model")
    assert re.search(r"quickstart\s+0\.\d\dM params", screen), screen
    assert "sizes include your --set model.size=tiny" in screen
    assert "⚠ may not fit" not in screen
    t.keys("Enter")  # the quickstart is the default

    text = t.wait_for(r"Launch now\?")
    t.save("plan")
    assert re.search(rf"machines\s+{re.escape(names[0])} \({re.escape(lab.hosts[0].wifi_ip)}\), "
                     rf"{re.escape(names[1])} \({re.escape(lab.hosts[1].wifi_ip)}\) → 2 ranks", text), text
    # The lab's h0 and h1 share a Thunderbolt cable: the ring runs over it, so auto picks per-step allreduce.
    assert re.search(rf"links\s+ring over Thunderbolt: {re.escape(names[0])} \S+ → {re.escape(names[1])}", text), text
    assert re.search(r"strategy\s+ddp \(auto: decided when the ranks start", text), text
    assert "macrun train --hosts hosts.json runs/wizard-lab.yaml" in text
    assert not (workspace / "hosts.json").exists() and not (workspace / "runs").exists()  # not before launch
    t.keys("Enter")

    status = t.wait_exit(timeout=120)
    text = t.save("launch", full=True)
    assert status == 0, text
    assert "done: checkpoints in runs/wizard-lab/checkpoints" in text
    ckpt = workspace / "runs" / "wizard-lab" / "checkpoints" / "step_00000020"
    assert ckpt.is_dir() and any(ckpt.iterdir()), text
    saved = json.loads((workspace / "hosts.json").read_text())
    assert [(e["name"], e["host"], e["python"]) for e in saved["hosts"]] == [
        (names[i], lab.hosts[i].wifi_ip, lab.hosts[i].python) for i in (0, 1)]
    run_cfg = (workspace / "runs" / "wizard-lab.yaml").read_text()
    assert "train:\n  steps: 20" in run_cfg.replace("\r", "") and "size: tiny" in run_cfg


# ---- trouble -------------------------------------------------------------------------------------------------
def test_no_machines_explains_remote_login_and_offers_an_address(lab: Lab, term, workspace: Path) -> None:
    t = term("none", ["--mdns-timeout", "0.5"], mdns="127.0.0.1")  # loopback: nobody announces there
    t.wait_for(r"Address of a Mac to add")
    screen = t.save("no-machines")
    assert "No machines found" in screen
    assert "System Settings → General → Sharing → Remote Login" in screen and "hosts.json" in screen
    t.type(lab.hosts[1].wifi_ip)  # add one by address; it is checked like any other
    t.keys("Enter")
    t.wait_for(r"Which Python has MLX on " + re.escape(lab.hosts[1].wifi_ip))
    t.type(lab.hosts[1].python)
    t.keys("Enter")
    t.wait_for(r"Which model\?")
    t.keys("C-c")
    assert t.wait_exit() == 130
    assert "cancelled: nothing was written" in t.save("no-machines-cancelled", full=True)
    assert not (workspace / "hosts.json").exists()


def test_no_machines_with_yes_fails_with_the_explanation(lab: Lab, workspace: Path) -> None:
    env = {**os.environ, "HOME": str(lab.ssh_home), "MACRUN_MDNS_INTERFACES": "127.0.0.1", "COLUMNS": "160"}
    out = subprocess.run([sys.executable, str(WIZARD), "--yes", "--mdns-timeout", "0.3"], cwd=workspace, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Remote Login" in out.stdout and "error: no machines to train on" in out.stderr
    assert sorted(p.name for p in workspace.iterdir()) == ["configs"]


def test_unreachable_machine_is_marked_with_its_reason_and_left_out(lab: Lab, term, workspace: Path) -> None:
    path = hosts_file(lab, workspace / "hosts.json", [0])
    data = json.loads(path.read_text())
    data["hosts"].append({"name": "ghost", "host": lab.hosts[2].wifi_ip, "port": 2})  # nothing listens there
    path.write_text(json.dumps(data, indent=2) + "\n")
    before = snapshot(workspace)
    t = term("unreachable", ["--no-mdns"])
    t.wait_for(r"Which machines should train\?")
    t.save("machines")
    t.keys("Enter")  # both are ticked: they come from hosts.json
    text = t.wait_for(r"Which model\?")
    t.save("check")
    assert re.search(r"ghost\s+│.*unreachable", text), text
    assert f"ghost: cannot reach ghost ({lab.hosts[2].wifi_ip}:2): connection refused" in text
    assert "left out: ghost (unreachable)" in text
    t.keys("Enter")
    text = t.wait_for(r"Launch now\?")
    t.save("plan")
    assert re.search(rf"machines\s+h0 \({re.escape(lab.hosts[0].wifi_ip)}\) → 1 rank;", text), text
    assert "runs/quickstart.hosts.json (just these machines)" in text  # hosts.json keeps ghost
    t.type("n")
    assert t.wait_exit() == 0
    assert "not launched; nothing was written" in t.save("declined", full=True)
    assert snapshot(workspace) == before


def test_model_too_big_for_the_smallest_mac_is_flagged(lab: Lab, term, workspace: Path) -> None:
    huge = (workspace / "configs" / "gpt2-small.yaml").read_text()
    (workspace / "configs" / "huge.yaml").write_text(
        "# GPT-2 small with an enormous batch: more memory than any Mac has.\n"
        + huge.replace("batch_size: 8", "batch_size: 512"))
    hosts_file(lab, workspace / "hosts.json", [0])
    before = snapshot(workspace)
    t = term("too-big", ["--no-mdns", "--select", "h0"])
    text = t.wait_for(r"Which model\?")
    screen = t.save("models")
    assert re.search(r"huge .*⚠ may not fit", screen) and not re.search(r"quickstart .*⚠", screen), screen
    order = [c.name for c in list_models(workspace / "configs")]
    t.keys(*["Down"] * (order.index("huge") - order.index("quickstart")), "Enter")
    text = t.wait_for(r"Use huge anyway\?")
    t.save("warning")
    assert re.search(r"warning: huge needs about [\d.]+ TiB per Mac, but h0 has \d+ GiB", text), text
    t.type("n")  # no: back to the list, where Ctrl-C leaves
    t.wait_for(r"Which model\?(.*\n)*.*Which model\?")
    t.keys("C-c")
    assert t.wait_exit() == 130
    assert snapshot(workspace) == before


def test_model_too_big_warns_in_a_script_too(lab: Lab, workspace: Path) -> None:
    hosts_file(lab, workspace / "hosts.json", [0])
    env = {**os.environ, "HOME": str(lab.ssh_home), "COLUMNS": "200"}
    out = subprocess.run([sys.executable, str(WIZARD), "--yes", "--no-mdns", "--dry-run", "--model", "gpt2-small",
                          "--set", "train.batch_size=512"], cwd=workspace, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"warning: gpt2-small needs about [\d.]+ TiB per Mac, but h0 has", out.stdout), out.stdout
    assert "dry run: nothing written" in out.stdout and not (workspace / "runs").exists()


def test_unknown_host_key_shows_the_fingerprint_and_is_trusted_on_yes(lab: Lab, term, workspace: Path,
                                                                      tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(lab.ssh_home, home)
    known = home / ".ssh" / "known_hosts"
    known.write_text("")
    hosts_file(lab, workspace / "hosts.json", [0])
    t = term("trust", ["--no-mdns", "--select", "h0"], home=home)
    text = t.wait_for(r"Trust h0's key\?")
    t.save("unknown-key")
    pub = lab.state_dir / "h0" / "sshd" / "ssh_host_ed25519_key.pub"
    expected = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True).stdout.split()[1]
    assert f"ED25519 {expected}" in text
    t.type("y")  # a confirm takes y/n without Enter
    t.wait_for(r"Which model\?")
    assert f"trusted h0: {expected}" in t.save("trusted")
    assert known.read_text().split()[:2] == [lab.hosts[0].wifi_ip, "ssh-ed25519"]
    t.keys("C-c")
    assert t.wait_exit() == 130
    assert "nothing was written (the key you trusted for h0 stays in ~/.ssh/known_hosts)" in t.save("cancelled",
                                                                                                  full=True)
    assert not (workspace / "runs").exists()


# ---- Ctrl-C at every question ----------------------------------------------------------------------------------
CTRL_C_CASES = {
    # step: (wizard args, hosts.json entries (None: no file), python in hosts.json, empty known_hosts, question)
    "machines": (["--mdns-timeout", "1"], None, True, False, r"Which machines should train\?"),
    "trust": (["--no-mdns", "--select", "h0"], [0], True, True, r"Trust h0's key\?"),
    "python": (["--no-mdns", "--select", "h0"], [0], False, False, r"Which Python has MLX on h0"),
    "model": (["--no-mdns", "--select", "h0"], [0], True, False, r"Which model\?"),
    "launch": (["--no-mdns", "--select", "h0", "--model", "quickstart"], [0], True, False, r"Launch now\?"),
}


@pytest.mark.parametrize("step", list(CTRL_C_CASES))
def test_ctrl_c_at_each_question_exits_130_and_writes_nothing(lab: Lab, term, workspace: Path, tmp_path: Path,
                                                              step: str) -> None:
    args, indices, python, unknown_key, question = CTRL_C_CASES[step]
    home = tmp_path / "home"
    shutil.copytree(lab.ssh_home, home)
    if unknown_key:
        (home / ".ssh" / "known_hosts").write_text("")
    if indices is not None:
        hosts_file(lab, workspace / "hosts.json", indices, python=python)
    before = snapshot(workspace, home)
    t = term(f"ctrl-c-{step}", args, home=home)
    t.wait_for(question)
    t.keys("C-c")
    status = t.wait_exit()
    text = t.save("cancelled", full=True)
    assert status == 130, text
    assert "cancelled: nothing was written" in text
    assert snapshot(workspace, home) == before
