"""Resume of a two-rank DDP run through the real CLI ends with the same weights as a straight run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from distributed.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
MACRUN = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "macrun")
CONFIG = {
    "run": {"name": "r"},
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 100_000, "seq_len": 32, "val_share": 0.1},
    "train": {"steps": 8, "batch_size": 2, "warmup_steps": 2, "eval_interval": 4, "eval_batches": 1,
              "checkpoint_interval": 4, "log_interval": 4},
    "strategy": {"mode": "ddp"},
}


def macrun(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = MACRUN if Path(MACRUN).exists() else "macrun"
    return subprocess.run([exe, "train", "--nproc", "2", "config.yaml", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=240)


def final_weights(run: Path) -> dict[str, np.ndarray]:
    ckpt, warnings = latest_checkpoint(run / "runs" / "r" / "checkpoints")
    assert ckpt is not None and not warnings and ckpt.step == 8
    return {k: np.array(v) for k, v in ckpt.groups["model"].items()}


def test_two_rank_resume_equals_straight_run(tmp_path: Path) -> None:
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    for d in (straight, halves):
        d.mkdir()
        (d / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    done = macrun(straight)
    assert done.returncode == 0, done.stderr + done.stdout
    first = macrun(halves, "--stop-at", "4")
    assert first.returncode == 0, first.stderr + first.stdout
    again = macrun(halves)  # without --resume an existing run is refused, nothing is overwritten
    assert again.returncode == 2 and "--resume" in again.stderr
    second = macrun(halves, "--resume")
    assert second.returncode == 0, second.stderr + second.stdout
    assert "resumed from" in second.stdout and "(step 4)" in second.stdout
    a, b = final_weights(straight), final_weights(halves)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
