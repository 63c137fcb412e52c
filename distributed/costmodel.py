"""Choosing DDP or DiLoCo from measured numbers: step time, model size, world size and the link's speed.

Pure arithmetic, no I/O: the worker feeds it a measured step time and a probed link, and prints the
returned reason. The rule: DDP when one gradient allreduce costs at most `DDP_MAX_SHARE` (a quarter) of a
training step, DiLoCo otherwise.

Why a quarter: macrun's DDP step does not overlap the allreduce with the backward pass (the all_sum runs
inside the compiled step, after the gradients exist), so the allreduce time adds straight onto every step.
At 25% DDP still runs at >= 80% of the ranks' compute speed while keeping exact per-step averaging; beyond
that, DiLoCo's one exchange per H steps wins on throughput by more than it typically costs in loss
(Douillard et al. 2023, arXiv:2311.08105, report DiLoCo matching synchronous training at H=500 with 8 workers).

DiLoCo's H, when strategy.inner_steps is 0 (auto): the smallest H in `INNER_STEPS_CHOICES` whose exposed
communication stays at most `EXPOSED_MAX_SHARE` (10%) of the round's compute, exposed/(H·step) <= 0.1, so
DiLoCo runs at >= 90% of compute speed. Smallest, because quality falls as H grows (Douillard et al. 2023,
Fig. 3; Charles et al. 2025, "Scaling Laws for DiLoCo", arXiv:2503.09799: the loss gap to data parallel
widens with H); at most 500, the DiLoCo paper's own setting: where even H=500 leaves more than 10% exposed,
H=500 is taken and the reason says so (a compressed exchange or strategy.overlap is the remedy). Without
overlap the whole exchange is exposed; with strategy.overlap it travels during the next round's H steps,
and only what outlasts them is. A short run caps H so that it still has `MIN_ROUNDS` outer rounds (the papers
run 50 and more; two rounds of 200 steps would barely train together), and the reason then says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distributed.errors import ConfigError

DDP_MAX_SHARE = 0.25  # allreduce time / step time at or below which DDP is chosen
EXPOSED_MAX_SHARE = 0.10  # DiLoCo, auto H: exposed exchange time / a round's compute time, at most
INNER_STEPS_CHOICES = (10, 20, 50, 100, 200, 500)  # auto H: round numbers, the largest the DiLoCo paper's
AUTO_INNER_STEPS = 0  # strategy.inner_steps meaning "the cost model chooses H"
MIN_ROUNDS = 10  # auto H leaves a run of train.steps at least this many outer rounds (never below the smallest H)
UNMEASURED_INNER_STEPS = 100  # auto H with nothing measured (one rank, or ranks started without the launcher)
MODES = ("auto", "ddp", "diloco")


@dataclass(frozen=True, slots=True)
class Decision:
    """What `choose_strategy` decided, and why (one line, for rank 0 to print)."""

    mode: str  # "ddp" or "diloco"
    inner_steps: int  # H, for DiLoCo: the user's, or the one chosen (passed through for DDP)
    allreduce_seconds: float  # modelled time of one allreduce of the model's bytes
    reason: str
    sync_seconds: float = 0.0  # modelled time of one DiLoCo exchange (its wire format's bytes)
    exposed_share: float = 0.0  # DiLoCo: exposed exchange time / a round's compute; DDP: allreduce / step


def ring_allreduce_seconds(nbytes: float, world_size: int, bandwidth_bytes_s: float, latency_s: float) -> float:
    """Time of a ring allreduce of `nbytes` over `world_size` ranks in the alpha-beta model.

    2(n-1) sequential steps (reduce-scatter, then all-gather), each moving nbytes/n over every link and
    paying one latency: 2(n-1)/n * nbytes / bandwidth + 2(n-1) * latency (Patarasuk & Yuan 2009,
    "Bandwidth optimal all-reduce algorithms for clusters of workstations"). Zero for one rank.
    """
    if world_size <= 1:
        return 0.0
    n = world_size
    return 2 * (n - 1) / n * nbytes / bandwidth_bytes_s + 2 * (n - 1) * latency_s


def exposed_seconds(sync_seconds: float, inner_steps: int, step_seconds: float, *, overlap: bool = False) -> float:
    """The part of one DiLoCo exchange that stops training: all of it, or with overlap (the exchange runs
    during the next round's `inner_steps` steps) only what outlasts them."""
    if overlap:
        return max(0.0, sync_seconds - inner_steps * step_seconds)
    return sync_seconds


def inner_steps_needed(sync_seconds: float, step_seconds: float, *, overlap: bool = False,
                       max_share: float = EXPOSED_MAX_SHARE) -> int:
    """The least H with exposed/(H·step) <= max_share: H >= sync/(max_share·step) without overlap, and
    H >= sync/((1 + max_share)·step) with it (sync - H·step <= max_share·H·step)."""
    per_step = (max_share + (1.0 if overlap else 0.0)) * step_seconds
    return max(1, math.ceil(sync_seconds / per_step - 1e-9))


def choose_inner_steps(sync_seconds: float, step_seconds: float, *, overlap: bool = False,
                       max_share: float = EXPOSED_MAX_SHARE, choices: tuple[int, ...] = INNER_STEPS_CHOICES,
                       steps: int | None = None) -> int:
    """Auto H: the smallest of `choices` that keeps exposed communication at most `max_share` of a round's
    compute; the largest allowed when none does. Allowed: all of `choices`, or for a run of `steps` those
    that leave it `MIN_ROUNDS` rounds (at least the smallest choice). See the module docstring."""
    ordered = sorted(choices)
    allowed = [h for h in ordered if steps is None or h * MIN_ROUNDS <= steps] or ordered[:1]
    needed = inner_steps_needed(sync_seconds, step_seconds, overlap=overlap, max_share=max_share)
    return next((h for h in allowed if h >= needed), allowed[-1])


def format_seconds(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    if seconds >= 0.01:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def choose_strategy(step_seconds: float, model_bytes: int, world_size: int, link_bandwidth_bytes_s: float,
                    link_latency_s: float, mode: str = "auto", inner_steps: int = AUTO_INNER_STEPS, *,
                    link: str = "the link", sync_bytes: float | None = None, overlap: bool = False,
                    steps: int | None = None) -> Decision:
    """Pick "ddp" or "diloco" for `mode="auto"`, or explain the forced `mode`; and DiLoCo's H when
    `inner_steps` is 0 (auto); see the module docstring.

    `step_seconds` is one training step's compute time on a rank, `model_bytes` the bytes of the
    gradients (= trainable parameters) exchanged per DDP step, `link` names the link in the reason.
    `sync_bytes` is what one rank sends per DiLoCo exchange in its wire format (distributed.compress.
    wire_bytes; default: a float32 ring allreduce of `model_bytes`), `overlap` whether strategy.overlap hides
    the exchange behind the next round, `steps` the run's length (auto H leaves it `MIN_ROUNDS` rounds).
    """
    if mode not in MODES:
        raise ConfigError(f"strategy.mode: {mode!r} is not one of {', '.join(MODES)}")
    if not (step_seconds > 0 and link_bandwidth_bytes_s > 0 and link_latency_s >= 0 and model_bytes >= 0
            and world_size >= 1 and inner_steps >= 0 and (sync_bytes is None or sync_bytes >= 0)):
        raise ValueError("need step_seconds > 0, link_bandwidth_bytes_s > 0, link_latency_s >= 0, "
                         "model_bytes >= 0, world_size >= 1, inner_steps >= 0 and sync_bytes >= 0")
    if world_size == 1:
        return Decision("ddp", inner_steps or UNMEASURED_INNER_STEPS, 0.0, "one rank: nothing to exchange")
    comm = ring_allreduce_seconds(model_bytes, world_size, link_bandwidth_bytes_s, link_latency_s)
    share = comm / step_seconds
    numbers = f"allreduce {format_seconds(comm)} vs step {format_seconds(step_seconds)} over {link}"
    chosen = mode if mode != "auto" else ("ddp" if share <= DDP_MAX_SHARE else "diloco")
    if chosen == "ddp":
        if mode == "auto":
            reason = f"{numbers} → DDP (communication {share:.0%} of a step, at most {DDP_MAX_SHARE:.0%})"
        else:
            reason = f"strategy.mode=ddp ({numbers}: communication adds {share:.0%} to every step)"
        return Decision("ddp", inner_steps or UNMEASURED_INNER_STEPS, comm, reason, comm, share)
    sync = comm if sync_bytes is None else \
        sync_bytes / link_bandwidth_bytes_s + 2 * (world_size - 1) * link_latency_s
    h = inner_steps or choose_inner_steps(sync, step_seconds, overlap=overlap, steps=steps)
    exposed = exposed_seconds(sync, h, step_seconds, overlap=overlap) / (h * step_seconds)
    head = f"{numbers} → DiLoCo" if mode == "auto" else f"strategy.mode=diloco ({numbers})"
    hidden = ", overlapped" if overlap else ""
    if inner_steps:
        reason = f"{head}, H={h}"
    else:
        capped = steps is not None and h < max(INNER_STEPS_CHOICES) and exposed > EXPOSED_MAX_SHARE + 1e-9
        reason = (f"{head}, H={h} auto (exchange {format_seconds(sync)}{hidden}: {exposed:.0%} of a round's "
                  f"compute exposed, at most {EXPOSED_MAX_SHARE:.0%}"
                  + (f"; H capped so that {steps} steps make >= {MIN_ROUNDS} rounds)" if capped else ")"))
    if exposed > EXPOSED_MAX_SHARE + 1e-9:
        needed = inner_steps_needed(sync, step_seconds, overlap=overlap)
        reason += f"; communication still {exposed:.0%} of a round: consider strategy.inner_steps >= {needed}"
        if not overlap:
            reason += " or strategy.overlap=true"
    return Decision("diloco", h, comm, reason, sync, exposed)
