"""Overlapped DiLoCo (strategy.overlap): round k's exchange travels while round k+1's inner steps run.

The exchange is started at a round boundary and waited for at the next one, so on a slow link (Wi-Fi)
the network time hides behind H inner steps instead of stopping every rank. The price: the outer update
of a round is applied one round late. This follows the overlap of Streaming DiLoCo (Douillard et al.
2025, arXiv:2501.18512, overlap of tau inner steps) with tau = H, the whole round, as in "Eager Updates
For Overlapped Communication and Computation in DiLoCo" (Kale et al. 2025, arXiv:2502.12996).

The rule (per rank r; theta and the outer momentum v stay identical on every rank at all times):

    a_r          the point rank r's current round started from (its "anchor"); x_r its local weights
    at boundary k (x_r after the round's H inner steps):
      d_r      = a_r - x_r                        this round's own progress (0, and flagged invalid, if NaN/Inf)
      wait for the exchange of round k-1, if one is in flight; with its mean D_{k-1} of the valid d's:
      theta, v = OuterSGD(theta, v, D_{k-1})      (distributed.diloco.outer_step: Nesterov, PyTorch's form)
      x_r      = theta - d_r;   a_r = x_r         rebase: round k's progress moved onto the new theta
      start the exchange of (d_r, valid_r); run round k+1's inner steps while it travels
    at the run's last boundary (its end, stop_at, or an agreed stop): as above, then wait at once and
      theta, v = OuterSGD(theta, v, D_k);  x_r = theta,  so the run ends with every round applied.

Why the rebase: theta moves (by round k-1's outer step) under a round that has already started from the
old theta. Adding round k's own progress d_r on top of the new theta, instead of restarting from theta,
keeps H steps of work; the next pseudo-gradient is measured from a_r, so each round's progress enters
theta exactly once (through the averaged, momentum-scaled outer step, one round late) and is never
counted twice. Until then a rank's own last round sits in its local weights at step size 1; when D_k
arrives, x_r = theta_new - d_{k+1,r} swaps that raw own round for the outer step of the average. This
is the eager paper's idea (a rank's own fresh progress as a proxy while the average travels) in a form
that keeps theta and v replicated, so checkpoints, the replica check and the stop vote keep their
meaning; the eager paper instead feeds (1/M)(own fresh) + the others' stale share into a per-rank outer
optimizer. Streaming DiLoCo's mix (x = alpha*x + (1-alpha)*theta_new) is meant for tau << H; with tau = H
it would throw away (1-alpha) of a whole round.

What the delay costs, measured (tiny GPT, 2 local ranks, H=10, 50 rounds; `macrun train`): final
validation loss 2.860 with overlap vs 2.775 without at outer lr 0.7 (seed 1: 2.997 vs 2.917), 2.810 vs
2.733 at 0.5, 2.797 at lr 0.7 with outer momentum 0.8: about 3% worse, which is why it is off by default
and worth it only where the exchange would otherwise stop the ranks for a large share of each round.

Collectives: the exchange runs on a thread of its own with its own MLX stream (`_Courier`), so MLX's ring
works on it while this thread trains; every wire format overlaps, including int4/int2, whose hops are driven
from Python. Measured on 2 real ranks with the peer 1.5 s late: no inner step stalled, the exchange ended
1.8 s after its start, during the steps (tests/integration/test_diloco_overlap.py). No other collective may
run on the group while one is in flight (their bytes would mix on the ring), so the stop vote waits for it
at the boundary and a replica check asked mid-flight runs at the next boundary. On a machine whose cores
are all training (the lab's 2 cores), the ring's spinning threads take CPU from the steps; on a Mac the
steps run on the GPU.

Checkpoints hold the resume point of the last boundary: theta, v and the round counter before the
in-flight exchange, plus the in-flight pseudo-gradient (rank 0's in the checkpoint, each other rank's in
its own state file beside it, see Strategy.rank_state). A resumed run starts the exchange again from
those and continues exactly as if never stopped (bit for bit with float32 and 16-bit exchanges; int8/int4
round stochastically from a per-rank key counter that the checkpoint does not hold, so theirs resumes
within the rounding). The last boundary's drain is not part of the resume point (it only makes the
exported weights complete). Switching overlap on or off between a run and its resume loses the round in
flight (and, for ranks other than 0, their own AdamW state: the saved set of arrays differs).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from distributed.compress import Exchanged, exchange, ring_sum_bytes
from distributed.diloco import GROUP, DiLoCoStrategy, _reset_nonfinite_moments, outer_step
from distributed.errors import TrainingError
from distributed.progress import PROGRESS

INFLIGHT, INFLIGHT_VALID = "diloco_inflight", "diloco_inflight_valid"  # rank-state keys (no dots: flat names)


class OverlapDiLoCoStrategy(DiLoCoStrategy):
    """DiLoCo whose outer exchange overlaps the next round's inner steps and is applied one round late."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exposed_seconds = 0.0  # waiting at boundaries for an exchange to finish (also in comm_seconds)
        self._exchange_seconds = 0.0  # every exchange, start to finish, hidden or not
        self._model: nn.Module | None = None
        self._courier: _Courier | None = None
        self._anchor: mx.array | None = None  # a_r: where this rank's current round started, flat float32
        self._sent: tuple[mx.array, bool] | None = None  # (d_r, valid_r) of the round in flight
        self._inflight: Future[tuple[Exchanged, float]] | None = None  # the exchange travelling, on the courier
        self._arrived: Exchanged | None = None  # the exchange waited for, not yet applied
        self._resubmit = False  # resumed with a round in flight: start its exchange at the first step
        self._found_own = True  # a rank other than 0 found its in-flight d_r beside the checkpoint
        self._resume_point: dict[str, Any] = {}  # what state_groups saves (taken before any final drain)
        self._check_due: int | None = None  # a replica check asked while an exchange was in flight

    @property
    def exchange_seconds(self) -> float:  # type: ignore[override]
        return self._exchange_seconds

    # -- start-up and resume -------------------------------------------------------------------

    def setup(self, model: nn.Module, *, rank: int, world_size: int) -> None:
        saved = self._restored
        super().setup(model, rank=rank, world_size=world_size)
        self._model, self._courier = model, _Courier()
        inflight = saved is not None and INFLIGHT in saved and bool(saved[INFLIGHT].item())
        if self.group is not None and world_size > 1:  # only rank 0 read the checkpoint
            flag = mx.distributed.all_sum(mx.array([1.0 if inflight and rank == 0 else 0.0]), group=self.group)
            inflight = bool(flag.item() > 0)
            self.bytes_sent += ring_sum_bytes(1, 4, world_size, rank)
        self._anchor = self._flatten(model)
        self._sent, self._resubmit = None, inflight
        if inflight:
            assert self.params is not None
            if saved is not None:  # rank 0: its own d_0 is in the checkpoint
                own = mx.concatenate([saved[f"{INFLIGHT}.{k}"].reshape(-1) for k, _, _ in self._layout])
                self._rebase(own, bool(saved[INFLIGHT_VALID].item()))
            else:  # until restore_rank_state brings this rank's own (else it sits the round out)
                self._found_own = False
                self._sent = (mx.zeros_like(self.params), False)
        self._take_resume_point()

    def rank_state(self) -> dict[str, mx.array]:
        """This rank's in-flight pseudo-gradient, saved beside the checkpoint by every rank but 0."""
        sent = self._resume_point.get("sent") or (mx.zeros_like(self.params), False)
        return {INFLIGHT: sent[0], INFLIGHT_VALID: mx.array(int(sent[1]), dtype=mx.int32)}

    def restore_rank_state(self, arrays: dict[str, mx.array]) -> None:
        if self._resubmit:
            self._found_own = True
            self._rebase(arrays[INFLIGHT].astype(mx.float32), bool(arrays[INFLIGHT_VALID].item()))
            self._take_resume_point()

    def _rebase(self, d: mx.array, valid: bool) -> None:
        """Local weights = theta - d (the round in flight, on top of theta); the next round starts there."""
        assert self._model is not None and self.params is not None
        self._load_into(self._model, self.params - d)
        self._anchor = self._flatten(self._model)
        self._sent = (d, valid)
        mx.eval(self._anchor)

    def _take_resume_point(self) -> None:
        self._resume_point = {"params": self.params, "momentum": self.momentum, "round": self.rounds,
                              "sent": self._sent}

    # -- the round boundary ----------------------------------------------------------------------

    def after_step(self, model: nn.Module, optimizer: Any, step: int, *, last: bool = False,
                   stop: bool = False) -> bool:
        if self._resubmit:
            self._resubmit = False
            if not self._found_own:
                self.log(f"rank {self.rank}: its in-flight pseudo-gradient was not beside the checkpoint; "
                         f"it sits out DiLoCo round {self.rounds + 1}")
            assert self._sent is not None
            self._launch(*self._sent, step)
        if not (step % self.inner_steps == 0 or last):
            return False
        self._wait()  # before any other collective on the group
        if self._check_due is not None:
            due, self._check_due = self._check_due, None
            super().check_replicas(model, due)
        agreed = self._stop_vote(step, stop)
        self.sync(model, optimizer, step, final=last or agreed)
        return agreed

    def sync(self, model: nn.Module, optimizer: Any, step: int, *, final: bool = False) -> None:
        """Apply the round in flight (already waited for), rebase this round onto theta, start its exchange."""
        if self.params is None or self._anchor is None:
            raise RuntimeError("OverlapDiLoCoStrategy.setup must run before the first step")
        d = self._anchor - self._flatten(model)
        valid = bool(mx.all(mx.isfinite(d)).item())
        if not valid:
            self.log(f"rank {self.rank}: pseudo-gradient has NaN/Inf at round {math.ceil(step / self.inner_steps)} "
                     f"(step {step}); contributing nothing this round")
            d = mx.zeros_like(d)
        self._apply(step)
        self._rebase(d, valid)
        if not valid:
            _reset_nonfinite_moments(optimizer)
        self._take_resume_point()
        self._launch(d, valid, step)
        if final:  # the run ends here: nothing may stay in flight
            self._wait()
            self._apply(step)
            self._load_into(model, self.params)
            self._anchor = self.params
            mx.eval(model.parameters())

    def _launch(self, d: mx.array, valid: bool, step: int) -> None:
        PROGRESS.enter(f"DiLoCo outer exchange of round {self.rounds + 1} (after step {step}), overlapped")
        assert self._courier is not None
        mx.eval(d)  # the courier thread gets data, not a graph on this thread's stream
        self._inflight = self._courier.submit(lambda: self._exchange(d, valid))

    def _exchange(self, d: mx.array, valid: bool) -> tuple[Exchanged, float]:
        """Runs on the courier thread: the whole exchange, every format, to its end."""
        started = time.perf_counter()
        sent = exchange(d, valid, self.group, self.exchange_dtype, self.exchange_state)
        mx.eval(sent.total, sent.count, *sent.arrays)
        return sent, time.perf_counter() - started

    def _wait(self) -> None:
        if self._inflight is None:
            return
        started = time.perf_counter()
        self._arrived, took = self._inflight.result()  # a lost peer's error is raised here, on this thread
        self._inflight = None
        waited = time.perf_counter() - started
        self.exposed_seconds += waited
        self.comm_seconds += waited
        self._exchange_seconds += max(took, waited)
        self.bytes_sent += self._arrived.bytes_sent

    def _apply(self, step: int) -> None:
        """The outer step on the mean of the round in flight (waited for), if there is one."""
        if self._arrived is None:
            return
        assert self.params is not None and self.momentum is not None
        total, count = self._arrived.total, self._arrived.count
        self._arrived = None
        round_no = self.rounds + 1
        self.valid_ranks = int(count.item())
        if self.valid_ranks == 0:
            raise TrainingError(f"every rank's pseudo-gradient has NaN/Inf at DiLoCo round {round_no} "
                                f"(applied after step {step})", hint="lower train.lr, or strategy.inner_steps")
        params, momentum = outer_step(self.params, self.momentum, total / self.valid_ranks, lr=self.outer_lr,
                                      mu=self.outer_momentum, nesterov=self.nesterov)
        if not bool(mx.all(mx.isfinite(params)).item()):
            raise TrainingError(f"the DiLoCo outer step of round {round_no} (applied after step {step}) gave "
                                "NaN/Inf weights", hint="lower strategy.outer_lr")
        self.params, self.momentum = params, momentum
        mx.eval(self.params, self.momentum)
        self.rounds = round_no

    # -- replicas and checkpoints ------------------------------------------------------------------

    def check_replicas(self, model: nn.Module, step: int) -> None:
        if self._inflight is None:
            super().check_replicas(model, step)
        else:  # a second collective beside the exchange would mix their bytes on the ring
            self._check_due = step

    def state_groups(self) -> dict[str, dict[str, mx.array]]:
        point = self._resume_point
        if not point or point["params"] is None:
            return {}
        sent = point["sent"]
        group = {"round": mx.array(point["round"], dtype=mx.int32),
                 INFLIGHT: mx.array(int(sent is not None), dtype=mx.int32),
                 INFLIGHT_VALID: mx.array(int(sent is not None and sent[1]), dtype=mx.int32)}
        group.update({f"params.{k}": v for k, v in self._pieces(point["params"])})
        group.update({f"momentum.{k}": v for k, v in self._pieces(point["momentum"])})
        if sent is not None:
            group.update({f"{INFLIGHT}.{k}": v for k, v in self._pieces(sent[0])})
        return {GROUP: group}


class _Courier:
    """One daemon thread with an MLX stream of its own, running exchanges one at a time.

    A thread, not just a stream: int4/int2 drive their ring hop by hop from Python, evaluating each send/recv
    (distributed.compress_wire.run_on_group), and MLX 0.32's streams belong to the thread that made them
    (using one from another thread raises "There is no Stream(cpu, N) in current thread"). A daemon, so a
    collective hung on a lost peer never keeps the process from exiting.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="diloco-exchange", daemon=True).start()

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((job, future))
        return future

    def _serve(self) -> None:
        stream = mx.new_stream(mx.cpu)
        while True:
            job, future = self._jobs.get()
            try:
                with mx.stream(stream):
                    future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread, which raises it
                future.set_exception(exc)
