"""The mlx-lm model on every host, over a real sshd on loopback: found, refused, pushed, resumed, verified.

The sshd logs in as this machine's user with the real home, while the client's HOME is isolated: a model
path written `~/<area>/model` is this test's folder here and an absent one on the "host", which is how a
host that lacks the model is emulated. Each test works in a fresh folder under the real home (`area`).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from distributed.errors import HostError
from distributed.models.mlxlm_memory import MemoryEstimate
from launcher.jobs.api import LaunchSpec, launch
from launcher.models import modelfiles
from launcher.models.modelfiles import ModelSpec, check_model, check_models, local_manifest
from launcher.models.modelpush import place_models, push_model
from launcher.room.fit import FitError
from launcher.room.hosts import HostSpec
from launcher.transport import ssh
from tests.support.sshd import SshdHandle, requires_openssh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), requires_openssh]
WEIGHTS = 3 << 20  # model.safetensors: big enough that a copy is many SFTP requests


@pytest.fixture
def area() -> Iterator[Path]:
    """A fresh folder under the host-side (real) home."""
    path = Path(tempfile.mkdtemp(prefix=".macrun-test-", dir=pwd.getpwuid(os.getuid()).pw_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_model(folder: Path, seed: int = 0) -> Path:
    """A model folder as far as the check is concerned: the files mlx-lm reads, plus one it does not."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "model.safetensors").write_bytes(os.urandom(WEIGHTS))
    (folder / "README.md").write_text("not compared, not copied\n")
    return folder


@pytest.fixture
def model(ssh_home: Path, area: Path) -> tuple[str, Path]:
    """(model.path as written, the folder here): `~/<area>/model` is absent on the host until a test adds it."""
    name = f"~/{area.name}/model"
    return name, write_model(ssh_home / area.name / "model")


@pytest.fixture
def conn(server: SshdHandle, ssh_home: Path, area: Path) -> Iterator[ssh.SSHConnection]:
    host = HostSpec(name="h1", hostname=server.host, port=server.port, python=sys.executable,
                    workdir=str(area / "work"))
    with ssh.connect(host) as c:
        yield c


def spec_for(model: tuple[str, Path], push: bool = False) -> ModelSpec:
    name, folder = model
    return ModelSpec(name=name, local_dir=folder, manifest=local_manifest(folder), push=push)


def test_manifest_lists_what_mlx_lm_reads_and_is_cached(model: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    first = local_manifest(model[1])
    assert [f.rel for f in first.files] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert first.total_bytes == sum((model[1] / f.rel).stat().st_size for f in first.files)
    monkeypatch.setattr(modelfiles, "file_digest", lambda _p: pytest.fail("hashed again"))
    assert local_manifest(model[1]) == first  # (path, size, mtime) unchanged: from the cache


def test_a_host_without_the_model_is_named_with_the_fix(conn: ssh.SSHConnection, model: tuple[str, Path],
                                                        area: Path) -> None:
    spec = spec_for(model)
    found = check_models([conn], spec)
    assert found["h1"].found is None
    with pytest.raises(HostError) as err:
        place_models([conn], spec, found, emit=print)
    assert f"h1 lacks it (looked in {area}/model)" in err.value.message
    assert "--push-model" in (err.value.hint or "")


def test_push_sends_the_model_once(conn: ssh.SSHConnection, model: tuple[str, Path], area: Path) -> None:
    spec, lines = spec_for(model, push=True), []
    dirs = place_models([conn], spec, check_models([conn], spec), emit=lines.append)
    store = area / "work" / "models" / spec.manifest.digest
    assert dirs == {"h1": str(store)}
    assert sorted(p.name for p in store.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (store / "model.safetensors").read_bytes() == (model[1] / "model.safetensors").read_bytes()
    summary = lines[-1]
    assert summary.startswith("model pushed to h1: 3 file(s), ") and f"{spec.manifest.total_bytes / 1e6:,.1f} MB" \
        in summary
    assert any("model -> h1: 100%" in line for line in lines)  # not a terminal: progress as lines

    lines.clear()  # a second launch: found in the store, nothing sent
    again = place_models([conn], spec, check_models([conn], spec), emit=lines.append)
    assert again == dirs and lines == ["model on h1: already there (0 bytes sent)"]


def test_an_interrupted_copy_continues_from_its_part(conn: ssh.SSHConnection, model: tuple[str, Path],
                                                     area: Path) -> None:
    spec = spec_for(model, push=True)
    store = area / "work" / "models" / spec.manifest.digest
    store.mkdir(parents=True)
    weights = (model[1] / "model.safetensors").read_bytes()
    (store / "model.safetensors.part").write_bytes(weights[:1_000_000])  # what a cut-off copy left
    report = push_model(conn, spec, _Quiet())
    assert report.resumed_bytes == 1_000_000
    assert report.bytes_sent == spec.manifest.total_bytes - 1_000_000
    assert (store / "model.safetensors").read_bytes() == weights and not (store / "model.safetensors.part").exists()


def test_a_part_that_is_not_the_files_beginning_is_sent_again(conn: ssh.SSHConnection, model: tuple[str, Path],
                                                              area: Path) -> None:
    spec = spec_for(model, push=True)
    store = area / "work" / "models" / spec.manifest.digest
    store.mkdir(parents=True)
    (store / "model.safetensors.part").write_bytes(b"\0" * 1000)
    report = push_model(conn, spec, _Quiet())
    assert report.bytes_sent == spec.manifest.total_bytes - 1000 + WEIGHTS  # the bad resume, then the whole file
    assert (store / "model.safetensors").read_bytes() == (model[1] / "model.safetensors").read_bytes()


def test_one_byte_changed_on_a_host_is_found(conn: ssh.SSHConnection, model: tuple[str, Path], area: Path) -> None:
    there = area / "model"
    shutil.copytree(model[1], there)
    spec = spec_for(model)
    assert check_model(conn, spec).found == str(there)  # the same files at model.path: used as they are
    data = bytearray((there / "model.safetensors").read_bytes())
    data[12345] ^= 1
    (there / "model.safetensors").write_bytes(bytes(data))
    found = check_models([conn], spec)
    assert found["h1"].found is None and found["h1"].looked[0].different == ("model.safetensors",)
    with pytest.raises(HostError) as err:
        place_models([conn], spec, found, emit=print)
    assert f"h1 holds another version (model.safetensors differs at {there})" in err.value.message
    # hashes on the host are cached by (size, mtime): the file written again is hashed again, not trusted
    cache = json.loads((area / "work" / "models" / ".hashes.json").read_text())
    assert str(there / "model.safetensors") in cache


def test_a_repo_name_is_looked_up_in_the_hosts_hugging_face_cache(tmp_path: Path, tmp_home: Path) -> None:
    home = tmp_path / "home"
    repo = home / ".cache" / "huggingface" / "hub" / "models--org--tiny"
    old, new = repo / "snapshots" / "aaa", repo / "snapshots" / "bbb"
    write_model(old, seed=1)
    write_model(new, seed=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbb")
    manifest = local_manifest(new)
    request = {"workdir": str(tmp_path / "work"), "digest": manifest.digest, "candidates": ["hf:org/tiny"],
               "files": [[f.rel, f.size, f.sha256] for f in manifest.files]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", modelfiles._REMOTE_CHECK], input=json.dumps(request), env=env,
                         capture_output=True, text=True, check=True).stdout
    answer = json.loads(out)
    assert answer["found"] == str(new) and answer["looked"][0]["dir"] == str(new)  # refs/main first


def test_launch_gives_each_rank_its_hosts_folder(conn: ssh.SSHConnection, server: SshdHandle,
                                                 model: tuple[str, Path], area: Path, tmp_path: Path) -> None:
    spec = spec_for(model, push=True)
    lines: list[str] = []
    result = launch(LaunchSpec(argv=["python", "-c", "import os; print('dir', os.environ['MACRUN_MODEL_DIR'])"],
                               run_dir=tmp_path / "run", hosts=[conn.host], min_battery=0.0, model=spec),
                    emit=lines.append)
    assert result.exit_code == 0, "\n".join(lines)
    assert f"[rank 0 h1] dir {area}/work/models/{spec.manifest.digest}" in lines


def test_launch_refuses_a_fine_tune_that_does_not_fit(conn: ssh.SSHConnection, model: tuple[str, Path],
                                                      area: Path, tmp_path: Path) -> None:
    estimate = MemoryEstimate(weights=1 << 50, trainable=1_000_000, activations=1 << 30, kind="lora", layers=16,
                              quantized=False, batch_size=4, seq_len=2048)
    spec = ModelSpec(name=model[0], local_dir=model[1], manifest=local_manifest(model[1]), push=True, memory=estimate)
    with pytest.raises(FitError) as err:
        launch(LaunchSpec(argv=["python", "-c", "pass"], run_dir=tmp_path / "run", hosts=[conn.host],
                          min_battery=0.0, model=spec), emit=lambda _line: None)
    assert "but h1 has" in err.value.message and "batch 4 x 2048 tokens" in err.value.message
    assert "train.batch_size (4)" in (err.value.hint or "") and "4-bit" in (err.value.hint or "")
    assert not (area / "work" / "models" / spec.manifest.digest).exists()  # refused before any copy


class _Quiet:
    """A TransferProgress that shows nothing."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add(self, host: str, nbytes: int) -> None:
        return None

    def advance(self, host: str, nbytes: int) -> None:
        return None


def test_macrun_train_pushes_the_model_and_the_rank_loads_it_from_the_store(
        conn: ssh.SSHConnection, ssh_home: Path, area: Path, tmp_path_factory: pytest.TempPathFactory,
        tmp_path: Path) -> None:
    import yaml

    from launcher.jobs.training import train_job
    from tests.support.tinyhf import tiny_models, write_dataset

    name = f"~/{area.name}/llama"
    shutil.copytree(tiny_models(tmp_path_factory.getbasetemp())["llama"], ssh_home / area.name / "llama")
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "ft", "output_dir": str(tmp_path / "runs")}, "model": {"source": "mlx-lm", "path": name},
        "data": {"path": str(write_dataset(tmp_path / "data", "chat", train=8, valid=2)), "seq_len": 32},
        "finetune": {"rank": 2, "layers": 1}, "fault": {"max_restarts": 0, "min_battery": 0},
        "train": {"steps": 2, "batch_size": 2, "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2,
                  "log_interval": 1}}))
    lines: list[str] = []
    result = train_job(config, hosts=[conn.host], push_model=True, emit=lines.append)
    assert result.exit_code == 0, "\n".join(lines)
    store = next((area / "work" / "models").glob("[0-9a-f]*"))
    assert any(line.startswith("model pushed to h1: 4 file(s)") for line in lines), lines
    assert any(f"model {name} from {store} (llama)" in line for line in lines), lines
    assert (tmp_path / "runs" / "ft" / "adapters" / "adapters.safetensors").is_file()
