"""The training entry point on every rank: `python -m distributed.worker CONFIG --data DIR --run-dir DIR`.

The launcher (`macrun train`) starts one of these per rank with the env contract set; started by hand
without it, the worker trains alone as rank 0 of 1. It joins the rendezvous (heartbeats), initialises
`mx.distributed` (ring backend) when there is more than one rank, picks the strategy and trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed.config import Config, load_config
from distributed.costmodel import AUTO_INNER_STEPS, UNMEASURED_INNER_STEPS
from distributed.env import RankEnv
from distributed.errors import MacrunError, report
from distributed.progress import PROGRESS
from distributed.strategy import DDPStrategy, Strategy

if TYPE_CHECKING:
    from distributed.train import TrainResult


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m distributed.worker", description=__doc__.splitlines()[0])
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("--data", required=True, help="the prepared data folder (train.bin/val.bin made by "
                   "prepare_data, or a fine-tune's examples made by prepare_finetune_data)")
    p.add_argument("--run-dir", required=True, help="folder for checkpoints and metrics")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--resume-at", type=int, default=None, metavar="STEP",
                   help="continue from the newest valid checkpoint at or before STEP (implies --resume)")
    p.add_argument("--stop-at", type=int, default=None, help="end early at this step (with a checkpoint)")
    return p.parse_args(argv)


def measure_step_seconds(cfg: Config, repeats: int = 3, task: Any = None, group: Any = None) -> float:
    """One training step's compute time on this rank (forward + backward of the real model and batch shape);
    `task` is a fine-tune's (distributed.finetune.FinetuneTask), whose model is timed on a full-length batch.

    With `group` (collective) the ranks start timing together after compiling, so ranks that share a host
    time while the others run too, as they will train, rather than beside another's compilation."""
    import time
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn

    from distributed.models.gpt import build_model, loss_fn

    if task is not None:
        model, loss, batch = task.model, task.loss, task.dummy_batch()
    else:
        model, loss = build_model(cfg.model, cfg.data.seq_len, cfg.run.seed), loss_fn
        shape = (cfg.train.batch_size, cfg.data.seq_len)
        batch = (mx.random.randint(0, 256, shape, key=mx.random.key(1)),
                 mx.random.randint(0, 256, shape, key=mx.random.key(2)))
    step = mx.compile(partial(nn.value_and_grad(model, loss), model))
    mx.eval(step(*batch))  # compile and warm up
    if group is not None:
        mx.eval(mx.distributed.all_sum(mx.array(0.0), group=group))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        mx.eval(step(*batch))
        times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def decide_auto(cfg: Config, env: RankEnv, group: Any, client: Any, task: Any = None,
                step_seconds: float | None = None, mode: str = "auto") -> tuple[str, str, int]:
    """Auto mode: measure the ring's links and a step (`step_seconds`: this rank's, when already timed), and let
    the cost model choose the strategy and, with strategy.inner_steps 0, DiLoCo's H (`mode="diloco"`: H alone);
    rank 0's word binds all. Returns (mode, reason, H)."""
    import mlx.core as mx

    from distributed.compress import wire_bytes
    from distributed.costmodel import choose_strategy as cost_choice
    from distributed.links import hostfile_address, measure_ring
    from distributed.models.gpt import build_model, count_params

    links = measure_ring(client, env.rank, env.world_size, hostfile_address(env.mlx_hostfile or "", env.rank),
                         tag=f"auto-{env.run_id}")
    bandwidth = min(m.bandwidth_bytes_s for m in links)
    latency = max(m.rtt_s for m in links) / 2
    mine = step_seconds if step_seconds is not None else measure_step_seconds(cfg, task=task, group=group)
    step = float(mx.distributed.all_sum(mx.array(mine), group=group).item()) / env.world_size
    # What travels is the gradient of what trains: for a LoRA fine-tune, the adapters alone.
    grads = task.trainable_bytes if task is not None else \
        count_params(build_model(cfg.model, cfg.data.seq_len, cfg.run.seed)) * 4  # float32 gradients
    sync = wire_bytes(grads // 4, env.world_size, cfg.strategy.exchange_dtype)  # one DiLoCo exchange's bytes
    decision = cost_choice(step, grads, env.world_size, bandwidth, latency, mode, cfg.strategy.inner_steps,
                           link=env.link, sync_bytes=sync, overlap=cfg.strategy.overlap, steps=cfg.train.steps)
    # Every rank computed the same from the same numbers; still, take rank 0's choice so they cannot split.
    mine = [1.0 if decision.mode == "diloco" else 0.0, float(decision.inner_steps)]
    vote, h = mx.distributed.all_sum(mx.array(mine if env.rank == 0 else [0.0, 0.0]), group=group).tolist()
    measured = f"slowest ring link {bandwidth * 8 / 1e9:.2f} Gbit/s, rtt {latency * 2e3:.2f} ms"
    return "diloco" if vote > 0.5 else "ddp", f"auto: {decision.reason} ({measured})", round(h)


def choose_strategy(cfg: Config, env: RankEnv | None, client: Any = None, task: Any = None) -> tuple[Strategy, str]:
    """The strategy for this run and the reason, printed by rank 0 (`task`: a fine-tune's, to time its step).

    DDP with strategy.balance=auto also agrees on the ranks' batch shares (distributed.balance) from a step
    each rank times (the one auto mode timed, when it did); the reason then has a second line, `balance: ...`.
    """
    from distributed.strategy import LocalStrategy

    if env is None or env.world_size == 1:
        if cfg.strategy.mode == "diloco":  # asked for explicitly: the outer step alone (useful to compare)
            from distributed.diloco import DiLoCoStrategy

            alone = dataclasses.replace(cfg.strategy, inner_steps=cfg.strategy.inner_steps or UNMEASURED_INNER_STEPS)
            return (DiLoCoStrategy.from_config(None, alone, log=lambda m: print(m, flush=True), steps=cfg.train.steps),
                    "strategy.mode=diloco with one rank: the outer step only")
        return LocalStrategy(), "one rank: nothing to exchange"
    import mlx.core as mx

    groups = None  # the rings of a Thunderbolt island plan (distributed/islands.py), when the launcher made one
    missing = ""  # why the islands offered cannot be opened (an MLX without clear_backends)
    if env.islands >= 2 and env.mlx_backend == "ring":
        from distributed.islands import IslandsUnavailable, open_groups

        try:
            groups = open_groups(env)
        except IslandsUnavailable as exc:  # raised before any ring opened, alike on every rank (one MLX version)
            missing = str(exc)
    group = groups.world if groups is not None else mx.distributed.init(backend=env.mlx_backend, strict=True)
    mode = cfg.strategy.mode
    reason = f"strategy.mode={mode}"
    if mode == "islands" and groups is None:  # one island (all cabled) is DDP; islands of one Mac each, DiLoCo
        mode = "ddp" if env.link == "thunderbolt" else "diloco"
        why = missing or ("the launcher found no Thunderbolt islands beside hosts on the network (the ring runs "
                          f"over {'Thunderbolt' if env.link == 'thunderbolt' else 'the network'})")
        reason = f"strategy.mode=islands, but {why} → {mode}"
    seconds = None  # this rank's timed step, shared by auto mode and balancing
    h = cfg.strategy.inner_steps or UNMEASURED_INNER_STEPS  # 0 = auto: chosen below when it can be measured
    measurable = client is not None and bool(env.mlx_hostfile)
    rounds_based = mode in ("diloco", "islands")
    if mode == "auto" or (rounds_based and cfg.strategy.inner_steps == AUTO_INNER_STEPS and measurable):
        if measurable:
            seconds = measure_step_seconds(cfg, task=task, group=group)
            asked = "diloco" if rounds_based else mode
            decided, why, h = decide_auto(cfg, env, group, client, task, step_seconds=seconds, mode=asked)
            mode = decided if mode == "auto" else mode
            reason = why if cfg.strategy.mode == "auto" else f"{reason}, {why.removeprefix('auto: ')}"
        else:  # started by hand without the launcher's rendezvous: the link's kind decides
            mode = "diloco" if env.link == "network" else "ddp"
            reason = f"auto: {env.link} link, not measured (no rendezvous) → {mode}"
        if cfg.strategy.mode == "auto" and mode == "diloco" and groups is not None:
            mode = "islands"
            reason += (f"\nislands: DDP over the cables inside each island, DiLoCo between the {groups.islands} "
                       "islands over the network (strategy.mode diloco makes every Mac its own DiLoCo worker)")
    if missing and cfg.strategy.mode != "islands":
        reason += f"\nislands: the launcher found some, but {missing}"
    if mode in ("diloco", "islands"):
        from distributed.diloco import DiLoCoStrategy

        if cfg.strategy.inner_steps == AUTO_INNER_STEPS and "H=" not in reason:
            reason += f", H={h} (strategy.inner_steps 0 = auto, nothing measured)"
        chosen = dataclasses.replace(cfg.strategy, inner_steps=h)
        if mode == "islands":
            from distributed.islands import IslandStrategy

            if cfg.strategy.overlap:
                reason += "\nstrategy.overlap is not available with islands: each exchange is waited for"
            diloco = IslandStrategy.from_config(groups, dataclasses.replace(chosen, overlap=False),  # type: ignore[arg-type]
                                                log=lambda m: print(m, flush=True), steps=cfg.train.steps)
        else:
            diloco = DiLoCoStrategy.from_config(group, chosen, log=lambda m: print(m, flush=True),
                                                steps=cfg.train.steps)
        if cfg.strategy.outer_lr == 0:  # chosen by H: say which, so a user can set it otherwise
            kind = "plain averaging" if diloco.outer_momentum == 0 else "Nesterov"
            reason += (f"\nouter step: {kind} (lr {diloco.outer_lr:g}, momentum {diloco.outer_momentum:g}), "
                       f"chosen for H={h} and {-(-cfg.train.steps // h)} rounds (strategy.outer_lr 0)")
        if mode == "diloco" and not cfg.strategy.overlap:
            reason += balance(diloco, cfg, env, group, task, seconds)
        elif mode == "diloco" and cfg.strategy.balance == "auto" and env.local_world_size < env.world_size:
            reason += "\nbalance: equal shares (strategy.overlap does not balance)"
        return diloco, reason
    strategy = DDPStrategy(group)
    return strategy, reason + balance(strategy, cfg, env, group, task, seconds)


def balance(strategy: Strategy, cfg: Config, env: RankEnv, group: Any, task: Any, seconds: float | None) -> str:
    """strategy.balance=auto (distributed/balance.py): the ranks agree on batch shares by measured speed and
    `strategy.shares` is set when they are unequal (DDP weights gradients by them, DiLoCo pseudo-gradients).
    Returns the line for the reason ("" when balance is off)."""
    if cfg.strategy.balance != "auto":
        return ""
    if env.local_world_size == env.world_size and seconds is None:
        # Every rank on this host (the env contract says so): they share its processor, nothing to balance,
        # and no step to time for it (auto mode timed one anyway: then the line shows the speeds).
        return f"\nbalance: equal shares of {cfg.train.batch_size} per rank, every rank is on one host"
    from distributed.balance import agree_shares

    seconds = seconds if seconds is not None else measure_step_seconds(cfg, task=task, group=group)
    batch = cfg.train.batch_size
    plan = agree_shares(batch / seconds, batch * env.world_size, group, host=socket.gethostname())
    strategy.shares = None if plan.equal else plan.shares
    return "\n" + plan.describe()


BATTERY_CHECK_S = 60.0


def watch_battery(min_percent: float, stop: threading.Event) -> None:
    """On a Mac with a battery: every minute, note in this rank's progress report whether it runs on battery
    below `min_percent`; the launcher then stops the run at the next sync and goes on without this Mac."""
    from distributed.probe import battery_problem, read_battery

    if min_percent <= 0 or read_battery() is None:
        return  # no battery (or not a Mac): nothing to watch

    def check() -> None:
        while True:
            PROGRESS.power = battery_problem(read_battery(), min_percent)
            if stop.wait(BATTERY_CHECK_S):
                return

    threading.Thread(target=check, name="battery-watch", daemon=True).start()


def done_line(result: TrainResult) -> str:
    """Rank 0's last line: `done: step N · loss X · val Y · T tok/s over S s (loss: mean of steps A-B)`.

    The loss is the one the last progress line printed (a mean over the steps since the one before), said
    so, rather than the final batch's alone, which is noisier and read as a different number. Log readers
    parse `done: step N · loss X · val Y` (tests/lab/test_lab_soak.py), so those pieces keep their places.
    """
    loss = f"{result.recent_loss:.3f}" if result.recent_loss is not None else "n/a"
    val = f"{result.val_loss:.3f}" if result.val_loss is not None else "n/a"
    line = (f"done: step {result.step} · loss {loss} · val {val} · "
            f"{result.tokens_per_s:,.0f} tok/s over {result.seconds:.1f} s")
    if result.recent_steps is not None:
        first, last = result.recent_steps
        line += f" (loss: mean of steps {first}-{last})" if first < last else f" (loss: step {last})"
    return line


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        env = RankEnv.from_environ() if "RANK" in os.environ else None
        rank, world = (env.rank, env.world_size) if env else (0, 1)
        heartbeat = client = None
        if env is not None and env.world_size > 0 and os.environ.get("MACRUN_SECRET"):
            from distributed.heartbeat import start_heartbeat
            from distributed.links import list_links
            from distributed.store import StoreClient

            client = StoreClient.from_env(env)
            heartbeat = start_heartbeat(client, env.rank, progress=PROGRESS,
                                        launcher_timeout=cfg.fault.launcher_timeout)
            watch_battery(cfg.fault.min_battery, heartbeat)
            # Where this rank can be reached, for the launcher and the other ranks (key: links/<rank>).
            client.set_json(f"links/{env.rank}", {"host": socket.gethostname(),
                                                  "links": [link.to_dict() for link in list_links()]})
        task = None
        if cfg.model.source == "mlx-lm":  # loaded once: timed for the auto strategy, then trained
            from distributed.train import make_task

            task = make_task(cfg, Path(args.data))
        strategy, reason = choose_strategy(cfg, env, client, task)
        if rank == 0:
            print(f"strategy {strategy.name}: {reason}", flush=True)
        from distributed.train import train

        result = train(cfg, data_dir=Path(args.data), run_dir=Path(args.run_dir), rank=rank, world_size=world,
                       strategy=strategy, resume=args.resume or args.resume_at is not None,
                       resume_at=args.resume_at, stop_at=args.stop_at,
                       log=lambda m: print(m, flush=True), task=task)
        if rank == 0:
            print(done_line(result), flush=True)
        if heartbeat is not None:
            heartbeat.set()
        if client is not None:
            client.close()
        return 0
    except MacrunError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
