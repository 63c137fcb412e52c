"""Choosing DDP or DiLoCo from measured numbers: step time, model size, world size and the link's speed.

Pure arithmetic, no I/O: the worker feeds it a measured step time and a probed link, and prints the
returned reason. The rule: DDP when one gradient allreduce costs at most `DDP_MAX_SHARE` (a quarter) of a
training step, DiLoCo otherwise.

Why a quarter: macrun's DDP step does not overlap the allreduce with the backward pass (the all_sum runs
inside the compiled step, after the gradients exist), so the allreduce time adds straight onto every step.
At 25% DDP still runs at >= 80% of the ranks' compute speed while keeping exact per-step averaging; beyond
that, DiLoCo's one exchange per H steps wins on throughput by more than it typically costs in loss
(Douillard et al. 2023, arXiv:2311.08105, report DiLoCo matching synchronous training at H=500 with 8 workers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distributed.errors import ConfigError

DDP_MAX_SHARE = 0.25  # allreduce time / step time at or below which DDP is chosen
MODES = ("auto", "ddp", "diloco")


@dataclass(frozen=True, slots=True)
class Decision:
    """What `choose_strategy` decided, and why (one line, for rank 0 to print)."""

    mode: str  # "ddp" or "diloco"
    inner_steps: int  # H, for DiLoCo (passed through for DDP)
    allreduce_seconds: float  # modelled time of one allreduce of the model's bytes
    reason: str


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


def format_seconds(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.0f} s"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    if seconds >= 0.01:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def choose_strategy(step_seconds: float, model_bytes: int, world_size: int, link_bandwidth_bytes_s: float,
                    link_latency_s: float, mode: str = "auto", inner_steps: int = 100, *,
                    link: str = "the link") -> Decision:
    """Pick "ddp" or "diloco" for `mode="auto"`, or explain the forced `mode`; see the module docstring.

    `step_seconds` is one training step's compute time on a rank, `model_bytes` the bytes of the
    gradients (= trainable parameters) exchanged per DDP step, `link` names the link in the reason.
    """
    if mode not in MODES:
        raise ConfigError(f"strategy.mode: {mode!r} is not one of {', '.join(MODES)}")
    if not (step_seconds > 0 and link_bandwidth_bytes_s > 0 and link_latency_s >= 0 and model_bytes >= 0
            and world_size >= 1 and inner_steps >= 1):
        raise ValueError("need step_seconds > 0, link_bandwidth_bytes_s > 0, link_latency_s >= 0, "
                         "model_bytes >= 0, world_size >= 1 and inner_steps >= 1")
    if world_size == 1:
        return Decision("ddp", inner_steps, 0.0, "one rank: nothing to exchange")
    comm = ring_allreduce_seconds(model_bytes, world_size, link_bandwidth_bytes_s, link_latency_s)
    share = comm / step_seconds
    numbers = f"allreduce {format_seconds(comm)} vs step {format_seconds(step_seconds)} over {link}"
    chosen = mode if mode != "auto" else ("ddp" if share <= DDP_MAX_SHARE else "diloco")
    if chosen == "ddp":
        if mode == "auto":
            reason = f"{numbers} → DDP (communication {share:.0%} of a step, at most {DDP_MAX_SHARE:.0%})"
        else:
            reason = f"strategy.mode=ddp ({numbers}: communication adds {share:.0%} to every step)"
        return Decision("ddp", inner_steps, comm, reason)
    round_share = comm / (inner_steps * step_seconds)
    reason = f"{numbers} → DiLoCo, H={inner_steps}"
    if mode != "auto":
        reason = f"strategy.mode=diloco ({numbers}), H={inner_steps}"
    if round_share > DDP_MAX_SHARE:
        needed = math.ceil(comm / (DDP_MAX_SHARE * step_seconds))
        reason += f"; communication still {round_share:.0%} of a round: consider strategy.inner_steps >= {needed}"
    return Decision("diloco", inner_steps, comm, reason)
