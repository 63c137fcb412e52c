"""`macrun train` as a launch: load the config, prepare the data once on the master, start the workers."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from distributed.checkpoint import latest_checkpoint
from distributed.config import Config, load_config
from distributed.data import prepare_data
from distributed.errors import ConfigError, UsageError
from distributed.finetune import EXPORTS
from launcher.jobs.api import LaunchSpec
from launcher.jobs.elastic import train_elastic
from launcher.jobs.job import RunResult
from launcher.room.hosts import HostSpec

if TYPE_CHECKING:
    from launcher.models.modelfiles import ModelSpec
    from launcher.views.display import TransferProgress


def plan_training(config_path: str | Path, overrides: Sequence[str] = (), *, hosts: Sequence[HostSpec] | None = None,
                  nproc: int = 1, resume: bool = False, stop_at: int | None = None, push_model: bool = False,
                  emit: Callable[[str], None] = print) -> tuple[Config, LaunchSpec]:
    """Validate everything that can be checked on this machine and build the launch; starts nothing.

    An mlx-lm fine-tune on hosts also gets a ModelSpec: the model's manifest, which every host must match
    (or receive, with `push_model`), and its memory estimate, which every host must fit.
    """
    cfg = load_config(config_path, overrides)
    if push_model and not hosts:
        raise UsageError("--push-model copies the model to hosts: it needs --hosts",
                         hint="local ranks load the model from this machine; drop --push-model")
    run_dir = cfg.run_dir().resolve()
    ckpts = run_dir / "checkpoints"
    if not resume and ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints of an earlier run",
                          hint="add --resume to continue it, or --set run.name=<new name> to start a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.source == "mlx-lm":  # tokenised here with the model's tokenizer (never downloaded)
        from distributed.sft_data import prepare_finetune_data

        prepared = prepare_finetune_data(cfg, run_dir / "data")
        emit(prepared.describe())
    else:
        prepared = prepare_data(cfg.data, run_dir / "data")
        emit(f"data: {prepared.train_tokens:,} training and {prepared.val_tokens:,} validation tokens "
             f"from {prepared.source}")
    config_file = run_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    resume_args = ["--resume"] if resume else []
    if hosts:
        # On hosts, everything lives in the job folder the launcher syncs: relative paths.
        files = {"config.yaml": config_file, **{f"data/{p.name}": p for p in sorted(prepared.dir.iterdir())
                                                if p.is_file()}}
        if resume:
            # Rank 0 reads the checkpoint; its host may not be the one that wrote it. Sync sends these files
            # only where they are missing or differ.
            latest, warnings = latest_checkpoint(ckpts)
            for w in warnings:
                emit(f"warning: {w}")
            if latest is not None:
                files.update({f"checkpoints/{latest.path.name}/{p.name}": p for p in sorted(latest.path.iterdir())})
            # A host may still hold a later checkpoint of an attempt whose copy never came back: the step
            # resumed from is the one this machine holds, so the restart's account and the ranks agree.
            resume_args = [f"--resume-at={latest.step if latest else 0}"]
        argv = ["python", "-m", "distributed.worker", "config.yaml", "--data", "data", "--run-dir", "."]
        # A fine-tune's exports (adapters/, model/) here are this run's once fetched: an earlier run's, left in
        # place, would pass for this one's if this run ends before it exports anything.
        for name in EXPORTS:
            shutil.rmtree(run_dir / name, ignore_errors=True)
    else:
        files = {}
        argv = ["python", "-m", "distributed.worker", str(config_file), "--data", str(prepared.dir),
                "--run-dir", str(run_dir)]
    extra = resume_args + ([f"--stop-at={stop_at}"] if stop_at else [])
    spec = LaunchSpec(argv=argv + extra, run_dir=run_dir, name=cfg.run.name, hosts=hosts, nproc=nproc,
                      files=files, fetch=("checkpoints", "metrics.jsonl", *EXPORTS) if hosts else (),
                      backend=cfg.strategy.backend,
                      model=_model_spec(cfg, push_model, emit) if hosts and cfg.model.source == "mlx-lm" else None)
    if push_model and cfg.model.source != "mlx-lm":
        emit("note: --push-model has nothing to copy: the built-in GPT needs no model files")
    return cfg, spec


def _model_spec(cfg: Config, push: bool, emit: Callable[[str], None]) -> ModelSpec:
    """The model every host must hold, with its manifest (hashes cached) and the memory one rank needs."""
    from distributed.models.mlxlm import resolve_model_path
    from distributed.models.mlxlm_memory import estimate_finetune_memory
    from launcher.models.modelfiles import ModelSpec, local_manifest

    folder = resolve_model_path(cfg.model.path)
    return ModelSpec(name=cfg.model.path, local_dir=folder, manifest=local_manifest(folder, emit), push=push,
                     memory=estimate_finetune_memory(folder, cfg))


def train_job(config_path: str | Path, overrides: Sequence[str] = (), *, hosts: Sequence[HostSpec] | None = None,
              nproc: int = 1, resume: bool = False, stop_at: int | None = None,
              accept_new_host_keys: bool = False, link: str = "auto", push_model: bool = False,
              emit: Callable[[str], None] = print, resume_command: str | None = None,
              transfers: Callable[[], TransferProgress] | None = None) -> RunResult:
    """Train a config on local ranks or on hosts, restarting after faults as `fault.*` allows; returns the
    last attempt's result (exit code included; see launcher.jobs.elastic)."""
    cfg = load_config(config_path, overrides)
    first = True

    def plan(active: Sequence[HostSpec] | None, again: bool) -> LaunchSpec:
        nonlocal first
        _cfg, spec = plan_training(config_path, overrides, hosts=active, nproc=nproc, resume=again,
                                   stop_at=stop_at, push_model=push_model, emit=emit if first else (lambda _line: None))
        first = False
        return replace(spec, link=link, transfers=transfers)

    command = resume_command or f"macrun train {'--hosts <hosts file> ' if hosts else ''}{config_path} --resume"
    return train_elastic(cfg, plan, hosts=hosts, resume=resume, accept_new_host_keys=accept_new_host_keys,
                         emit=emit, resume_command=command)
