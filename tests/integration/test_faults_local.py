"""Faults on local ranks, end to end: a stuck collective, a killed rank, Ctrl-C, DiLoCo's per-rank state and a
resume with another world size. Real launcher, real shims, real MLX ring on loopback, tiny model."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import yaml
from rich.console import Console

from distributed.checkpoint import (
    flatten_tree,
    latest_checkpoint,
    load_checkpoint,
    load_rank_state,
    save_rank_state,
)
from distributed.progress import SKIP_COLLECTIVE_ENV
from launcher.jobs.job import RankState, RunResult, render_failure_table
from launcher.jobs.training import train_job
from tests.support.sshd import descendants

pytestmark = [pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
MACRUN = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "macrun")
NAME = "f"
BATCH = 4
CONFIG: dict[str, Any] = {
    "run": {"name": NAME},
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 200_000, "seq_len": 32, "val_share": 0.05},
    "train": {"steps": 40, "batch_size": BATCH, "warmup_steps": 3, "eval_interval": 0, "eval_batches": 1,
              "checkpoint_interval": 5, "keep_checkpoints": 50, "log_interval": 5},
    "strategy": {"mode": "ddp"},
    "fault": {"max_restarts": 0},
}
STEP_LINE = re.compile(r"^\[rank 0 [^\]]*\] step (\d+)/(\d+) ")
BOUND_S = 120.0  # generous: a busy 2-core machine runs these ranks several times slower than an idle one


# --- helpers ------------------------------------------------------------------------------------------


@pytest.fixture
def run_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder holding config.yaml; runs go to ./runs/f."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    monkeypatch.chdir(tmp_path)
    return tmp_path


class Lines:
    """An emit callback that keeps every line and can act on one (called from the launcher's reader threads)."""

    def __init__(self, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.on_line = on_line
        self.errors: list[BaseException] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.on_line is not None:
            try:
                self.on_line(line)
            except BaseException as exc:  # the launcher swallows emit's errors: keep them for the test
                self.errors.append(exc)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def train(overrides: dict[str, Any], *, nproc: int = 2, resume: bool = False, stop_at: int | None = None,
          emit: Lines | None = None) -> tuple[RunResult, Lines]:
    emit = emit or Lines()
    result = train_job("config.yaml", [f"{k}={v}" for k, v in overrides.items()], nproc=nproc, resume=resume,
                       stop_at=stop_at, emit=emit)
    assert not emit.errors, emit.errors
    return result, emit


def run_dir(cwd: Path, name: str = NAME) -> Path:
    return cwd / "runs" / name


def events(cwd: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir(cwd) / "events.jsonl").read_text().splitlines()]


def kinds(evs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in evs]


def latest_step(cwd: Path) -> int | None:
    found, _ = latest_checkpoint(run_dir(cwd) / "checkpoints")
    return found.step if found is not None else None


def checkpoint_steps(cwd: Path) -> list[int]:
    root = run_dir(cwd) / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.iterdir() if p.name.startswith("step_"))


def weights(cwd: Path, name: str = NAME) -> dict[str, np.ndarray]:
    found, warnings = latest_checkpoint(run_dir(cwd, name) / "checkpoints")
    assert found is not None and not warnings
    return {k: np.array(v) for k, v in found.groups["model"].items()}


def rendered(renderable: object) -> str:
    buffer = StringIO()
    Console(file=buffer, width=400, color_system=None, force_terminal=False).print(renderable)
    return buffer.getvalue()


def worker_pid(rank: int) -> int | None:
    """The pid of this test's training worker of `rank` (cmdline has distributed.worker, env RANK=<rank>)."""
    for pid in descendants(os.getpid()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"distributed.worker" in cmdline and f"RANK={rank}".encode() in environ:
            return pid
    return None


class Cli:
    """`macrun train ...` as a background process in its own session (as a terminal would run it); stdout and
    stderr are collected line by line."""

    def __init__(self, cwd: Path, *args: str) -> None:
        exe = MACRUN if Path(MACRUN).exists() else "macrun"
        self.argv = [exe, "train", *args]
        self.proc = subprocess.Popen(self.argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def wait_for(self, test: Callable[[str], bool], timeout: float = BOUND_S) -> str:
        """The first stdout line passing `test`, polled with a bound."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            lines = list(self.out)
            for line in lines[seen:]:
                if test(line):
                    return line
            seen = len(lines)
            if self.proc.poll() is not None and len(self.out) == seen:
                break
            time.sleep(0.05)
        raise AssertionError(f"no such line within {timeout} s; output:\n" + self.text)

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # like a terminal: to the foreground group (ranks have their own)

    def finish(self, timeout: float = BOUND_S) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.out) + "\n--- stderr ---\n" + "\n".join(self.err)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def cli(run_in: Path) -> Iterator[Callable[..., Cli]]:
    started: list[Cli] = []

    def start(*args: str) -> Cli:
        c = Cli(run_in, "--nproc", "2", "config.yaml", *args)
        started.append(c)
        return c

    yield start
    for c in started:  # a failed test leaves no launcher behind (its ranks end once the launcher is gone)
        c.kill()


def step_of(line: str) -> int | None:
    match = STEP_LINE.match(line)
    return int(match.group(1)) if match else None


# --- a. the watchdog --------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_watchdog_names_the_rank_that_skipped_its_collective(run_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SKIP_COLLECTIVE_ENV, "1:12")  # rank 1 never joins the all_sum of step 12
    result, out = train({"fault.progress_timeout": 3, "fault.max_restarts": 0})
    assert result.exit_code == 1, out.text
    first = result.first_failure
    assert first is not None and first.rank == 1 and first.state is RankState.STUCK, out.text
    assert "skipped" in first.reason and re.search(r"\bat step 11\b", first.reason), first.reason
    assert first.detected_after is not None and first.detected_after >= 3
    assert {r.rank: r.state for r in result.ranks}[0] is RankState.KILLED
    table = rendered(render_failure_table(result))
    rows = [line for line in table.splitlines() if re.match(r"^\W*\d+\s*\W+\s*localhost", line)]
    assert "stuck" in rows[0] and re.match(r"^\W*1\b", rows[0]), table  # the root cause comes first
    assert any("watchdog: the run is stuck" in line and "rank 1 (localhost)" in line for line in out.lines)

    evs = events(run_in)
    assert kinds(evs) == ["start", "fault", "end"], evs
    fault = evs[1]
    assert (fault["cause"], fault["rank"]) == ("stuck", 1) and "skipped" in fault["reason"]
    assert fault["detected_after_s"] >= 3
    assert evs[-1]["exit_code"] == 1 and "failed after 0 restart(s)" in evs[-1]["outcome"]
    assert latest_step(run_in) == 10  # the last checkpoint before the hang is kept
    assert any("giving up after 0 restart(s)" in line and "--resume" in line for line in out.lines)


@pytest.mark.timeout(240)
def test_watchdog_restart_finishes_the_run(run_in: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SKIP_COLLECTIVE_ENV, "1:12")  # fires only in an attempt from step 0
    result, out = train({"fault.progress_timeout": 3, "fault.max_restarts": 1})
    assert result.exit_code == 0, out.text
    evs = events(run_in)
    assert kinds(evs) == ["start", "fault", "restart", "start", "end"], evs
    fault, restart, again = evs[1], evs[2], evs[3]
    assert (fault["cause"], fault["rank"]) == ("stuck", 1) and fault["detected_after_s"] >= 3
    assert (restart["restart"], restart["max_restarts"], restart["planned"]) == (1, 1, False)
    assert restart["from_step"] == 10 == again["from_step"] and restart["world_size"] == 2
    assert restart["steps_redone"] == 1  # both ranks had finished step 11 when the hang began
    assert evs[-1]["outcome"] == "finished" and evs[-1]["restarts"] == 1
    assert latest_step(run_in) == 40
    assert "resumed from" in out.text and "(step 10)" in out.text
    assert "restart 1 of 1: 2 rank(s), from the checkpoint at step 10" in out.text


# --- b. a rank killed with SIGKILL -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_a_killed_rank_restarts_from_the_last_checkpoint(run_in: Path) -> None:
    steps, interval = 80, 5
    killed: dict[str, int] = {}

    def kill_rank1(line: str) -> None:
        step = step_of(line)
        if step is not None and step >= 10 and not killed:
            pid = worker_pid(1)
            assert pid is not None, "rank 1's worker is not among this test's processes"
            killed.update(pid=pid, after_step=step)
            os.kill(pid, signal.SIGKILL)

    result, out = train({"train.steps": steps, "fault.max_restarts": 1}, emit=Lines(kill_rank1))
    assert killed, out.text
    assert result.exit_code == 0, out.text
    evs = events(run_in)
    assert kinds(evs) == ["start", "fault", "restart", "start", "end"], evs
    fault, restart = evs[1], evs[2]
    assert (fault["cause"], fault["rank"]) == ("failed", 1), fault
    assert "SIGKILL" in fault["reason"], fault
    assert restart["restart"] == 1 and restart["from_step"] % interval == 0
    assert killed["after_step"] <= restart["from_step"] + interval  # rank 0 announced that checkpoint or later
    assert restart["from_step"] >= killed["after_step"] - interval
    # steps_redone comes from the last progress report (heartbeats every 2 s): None when none arrived yet.
    assert restart["steps_redone"] is None or 0 <= restart["steps_redone"] <= interval, restart
    # What the first attempt really finished (from rank 0's metrics) is within one checkpoint interval too.
    rows = [json.loads(line)["step"] for line in (run_dir(run_in) / "metrics.jsonl").read_text().splitlines()]
    again = next((i for i in range(1, len(rows)) if rows[i] <= rows[i - 1]), None)  # the restart logs anew
    first_attempt = rows[:again] if again is not None else [r for r in rows if r <= restart["from_step"]]
    assert 0 <= max(first_attempt) - restart["from_step"] <= interval, (rows, restart)
    assert latest_step(run_in) == steps and rows[-1] == steps


# --- c. Ctrl-C ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ddp", "diloco"])
def test_first_ctrl_c_stops_at_a_sync_with_a_checkpoint(run_in: Path, cli: Callable[..., Cli], mode: str) -> None:
    steps, inner = 300, 10
    sets = ["--set", f"strategy.mode={mode}", "--set", f"train.steps={steps}", "--set", "train.checkpoint_interval=0",
            "--set", f"strategy.inner_steps={inner}"]
    run = cli(*sets)
    run.wait_for(lambda line: step_of(line) is not None)
    run.ctrl_c()
    code = run.finish()
    assert code == 130, run.text
    text = "\n".join(run.out)
    assert "[macrun] stopping: every rank saves a checkpoint at its next sync" in text
    stopped = re.search(r"stopped at step (\d+) as asked", text)
    assert stopped, run.text
    at = int(stopped.group(1))
    assert 0 < at < steps
    if mode == "ddp":
        assert checkpoint_steps(run_in) == [at]  # train.checkpoint_interval=0: only the stop wrote one
    else:  # DiLoCo stops at the end of a round, and checkpoints every round (fault.sync_checkpoints)
        assert at % inner == 0, at
        assert checkpoint_steps(run_in) == list(range(inner, at + 1, inner))
    assert load_checkpoint(run_dir(run_in) / "checkpoints" / f"step_{at:08d}").meta["strategy"] == mode
    continue_line = next(line for line in run.out if "continue with:" in line)
    command = shlex.split(continue_line.split("continue with:", 1)[1])
    assert command[0] == "macrun" and command[-1] == "--resume" and "config.yaml" in command
    assert "Traceback" not in run.text
    evs = events(run_in)
    assert kinds(evs) == ["start", "end"], evs  # a stop asked for is not a fault
    assert evs[-1]["exit_code"] == 130 and evs[-1]["outcome"].endswith(f"with a checkpoint (step {at})")

    resumed = cli(*command[command.index("config.yaml") + 1:])  # the printed command, as typed
    assert resumed.finish() == 0, resumed.text
    assert f"(step {at})" in "\n".join(resumed.out)
    assert latest_step(run_in) == steps
    evs = events(run_in)
    assert kinds(evs) == ["start", "end", "start", "end"] and evs[2]["from_step"] == at


@pytest.mark.timeout(240)
def test_second_ctrl_c_stops_at_once(run_in: Path, cli: Callable[..., Cli]) -> None:
    # DiLoCo with a sync only every 5000 steps: a graceful stop would wait minutes for it.
    run = cli("--set", "strategy.mode=diloco", "--set", "train.steps=10000", "--set", "strategy.inner_steps=5000",
              "--set", "train.checkpoint_interval=0")
    run.wait_for(lambda line: step_of(line) is not None)
    run.ctrl_c()
    run.wait_for(lambda line: line.startswith("[macrun] stopping: every rank saves a checkpoint"))
    second = time.monotonic()
    run.ctrl_c()
    code = run.finish()
    took = time.monotonic() - second
    assert code == 130, run.text
    assert took < 30, f"the second Ctrl-C took {took:.1f} s to stop the run"
    last = max(s for line in run.out if (s := step_of(line)) is not None)
    assert last < 5000
    ckpts = run_dir(run_in) / "checkpoints"
    assert not ckpts.exists() or not any(p.name.startswith("step_") for p in ckpts.iterdir())
    assert "continue with:" not in "\n".join(run.out)  # no checkpoint was promised
    assert [(e["event"], e.get("outcome")) for e in events(run_in)] == [("start", None), ("end", "interrupted")]


# --- d. DiLoCo: each rank's own inner optimizer state ---------------------------------------------------------


DILOCO = {"strategy.mode": "diloco", "strategy.inner_steps": 5, "train.steps": 20, "train.checkpoint_interval": 0}


def rank_state(cwd: Path, name: str, rank: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arrays, meta = mx.load(str(run_dir(cwd, name) / "rank_state" / f"rank-{rank}.safetensors"), return_metadata=True)
    return {k: np.array(v) for k, v in arrays.items()}, meta


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not np.allclose(a[k], b[k], rtol=1e-5, atol=1e-7)]


@pytest.mark.timeout(300)
def test_diloco_rank_keeps_its_own_inner_state_across_a_resume(run_in: Path) -> None:
    straight, _ = train({**DILOCO, "run.name": "straight"})
    assert straight.exit_code == 0

    first, _ = train({**DILOCO, "run.name": NAME}, stop_at=10)
    assert first.exit_code == 0
    own, meta = rank_state(run_in, NAME, 1)
    assert meta["step"] == "10" and meta["rank"] == "1"
    assert not (run_dir(run_in) / "rank_state" / "rank-0.safetensors").exists()  # rank 0's is in the checkpoint
    ckpt = load_checkpoint(run_dir(run_in) / "checkpoints" / "step_00000010")
    rank0 = {k: np.array(v) for k, v in ckpt.groups["optimizer"].items()}
    moments = differing(own, rank0)  # AdamW's m and v of each parameter: rank 1 saw other data than rank 0
    all_moments = [k for k in own if k.endswith((".m", ".v"))]
    assert set(moments) <= set(all_moments) and len(moments) > len(all_moments) // 2, moments

    second, out = train({**DILOCO, "run.name": NAME}, resume=True)
    assert second.exit_code == 0, out.text
    assert "(step 10)" in out.text
    assert rank_state(run_in, NAME, 1)[1]["step"] == "20"
    # With its own moments restored, rank 1 goes on exactly as in the straight run.
    assert differing(weights(run_in, NAME), weights(run_in, "straight")) == []

    # Control: without its file, rank 1 falls back to rank 0's moments and the weights come out different.
    first, _ = train({**DILOCO, "run.name": "fallback"}, stop_at=10)
    (run_dir(run_in, "fallback") / "rank_state" / "rank-1.safetensors").unlink()
    again, out = train({**DILOCO, "run.name": "fallback"}, resume=True)
    assert again.exit_code == 0, out.text
    assert differing(weights(run_in, "fallback"), weights(run_in, "straight")) != []


@pytest.mark.timeout(60)
def test_rank_state_is_used_only_at_its_own_step_and_shape(tmp_path: Path) -> None:
    state = {"step": mx.array(10, dtype=mx.uint64), "layer": {"m": mx.ones((3, 4)), "v": mx.full((3, 4), 2.0)}}
    path = save_rank_state(tmp_path, 1, 10, state)
    assert path == tmp_path / "rank_state" / "rank-1.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["rank-1.safetensors"]  # no temp file left behind
    loaded = load_rank_state(tmp_path, 1, 10, state)
    assert loaded is not None
    assert {k: np.array(v).tolist() for k, v in flatten_tree(loaded).items()} == \
        {k: np.array(v).tolist() for k, v in flatten_tree(state).items()}
    assert load_rank_state(tmp_path, 1, 11, state) is None  # saved at another step
    assert load_rank_state(tmp_path, 2, 10, state) is None  # no file for this rank
    other = {"step": mx.array(10, dtype=mx.uint64), "layer": {"m": mx.ones((4, 4)), "v": mx.ones((4, 4))}}
    assert load_rank_state(tmp_path, 1, 10, other) is None  # another model's shapes
    fewer = {"step": mx.array(10, dtype=mx.uint64), "layer": {"m": mx.ones((3, 4))}}
    assert load_rank_state(tmp_path, 1, 10, fewer) is None
    save_rank_state(tmp_path, 1, 12, state)  # replaced at each checkpoint
    assert load_rank_state(tmp_path, 1, 10, state) is None and load_rank_state(tmp_path, 1, 12, state) is not None
    path.write_bytes(b"not safetensors")
    assert load_rank_state(tmp_path, 1, 12, state) is None


# --- e. resume with another world size --------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_resume_with_three_ranks_continues_the_data_stream(run_in: Path) -> None:
    overrides = {"train.steps": 20}
    first, _ = train(overrides, nproc=2, stop_at=10)
    assert first.exit_code == 0
    second, out = train(overrides, nproc=3, resume=True)
    assert second.exit_code == 0, out.text
    assert "2 rank(s) then, 3 now" in out.text
    steps = checkpoint_steps(run_in)
    assert steps == [5, 10, 15, 20]
    for step in steps:
        meta = load_checkpoint(run_dir(run_in) / "checkpoints" / f"step_{step:08d}").meta
        before, after = min(step, 10), max(0, step - 10)
        assert meta["stream_position"] == 2 * BATCH * before + 3 * BATCH * after, (step, meta["stream_position"])
        assert meta["world_size"] == (2 if step <= 10 else 3)
    assert latest_step(run_in) == 20
