"""An mlx-lm LoRA fine-tune on three emulated hosts that lack the model: `--push-model` sends it once (the
second launch sends nothing), the ranks train from the copy on their own host, and the adapter comes back.

The model is a tiny random-weight Llama in Hugging Face layout (tests/support/tinyhf.py), kept under the
master's HOME and named `~/tinyllama`: on each host `~` is that host's own home, where it is not, so the
launcher must find it missing and copy it. The hosts' Python has MLX and mlx-lm (as a Mac that fine-tunes).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.lab.labnet import Lab
from tests.lab.labsetup import LabUnavailable, ensure_host_python
from tests.lab.scripts.macrun_proc import assert_one_error, run_macrun
from tests.support.tinyhf import tiny_models, write_dataset

pytestmark = pytest.mark.timeout(300)

STEPS = 6


def test_push_model_once_then_train_and_fetch_the_adapter(lab: Lab, tmp_path: Path,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    try:
        python = ensure_host_python(with_mlx_lm=True)
    except LabUnavailable as exc:
        pytest.skip(f"no hosts' Python with mlx-lm: {exc}")
    model = tiny_models(tmp_path_factory.getbasetemp())["llama"]
    home_model = lab.ssh_home / "tinyllama"
    shutil.rmtree(home_model, ignore_errors=True)
    shutil.copytree(model, home_model)
    data = write_dataset(tmp_path / "chat", "chat")
    hosts = lab.write_hosts_file(tmp_path / "hosts.json", python=python)
    config = tmp_path / "lora.yaml"
    config.write_text(
        "run:\n  name: lora-lab\nmodel:\n  source: mlx-lm\n  path: ~/tinyllama\n"
        f"data:\n  path: {data}\n  seq_len: 64\nfinetune:\n  type: lora\n  rank: 4\n  layers: -1\n"
        f"train:\n  steps: {STEPS}\n  batch_size: 2\n  warmup_steps: 1\n  log_interval: 2\n  eval_interval: {STEPS}\n"
        f"  eval_batches: 2\n  checkpoint_interval: {STEPS}\nstrategy:\n  mode: ddp\n")

    # Without --push-model the hosts that lack the model are named, with the fix, before anything starts.
    refused = run_macrun(["train", "--hosts", str(hosts), str(config)], home=lab.ssh_home, cwd=tmp_path)
    assert_one_error(refused, 3, "the model ~/tinyllama is not the same on every host",
                     *(h.name for h in lab.hosts))
    assert "--push-model" in refused.stderr

    first = run_macrun(["train", "--hosts", str(hosts), str(config), "--push-model"], home=lab.ssh_home,
                       cwd=tmp_path, timeout=240)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr
    pushed = re.search(r"model pushed to (.*?): (\d+) file\(s\)", first.stdout)
    assert pushed is not None and all(h.name in pushed.group(1) for h in lab.hosts), first.stdout
    assert f"done: step {STEPS}" in first.stdout
    adapters = tmp_path / "runs" / "lora-lab" / "adapters"
    assert (adapters / "adapters.safetensors").is_file(), first.stdout[-3000:]
    assert json.loads((adapters / "adapter_config.json").read_text())["fine_tune_type"] == "lora"

    # A second run (a new name: no --resume) finds the copies and sends nothing.
    second = run_macrun(["train", "--hosts", str(hosts), str(config), "--push-model", "--set", "run.name=again"],
                        home=lab.ssh_home, cwd=tmp_path, timeout=240)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr
    assert re.search(r"model on .*: already there \(0 bytes sent\)", second.stdout), second.stdout
    assert "model pushed" not in second.stdout
