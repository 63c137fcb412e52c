"""The DiLoCo wire formats on real `mx.distributed` ring ranks on loopback (2 and 3 processes).

For every format, two exchanges in a row (all ranks valid, then rank 1 out with NaNs), on sizes that leave
partial blocks and uneven chunks. Checked: the sum against NumPy within the format's stated bound (the
bounds and inputs of tests/unit/test_compress_formats.py), bit-identical results on every rank, the integer
formats bit for bit equal to the in-process simulation (same seeds: the ranks really ran that code), and the
bytes each rank counted equal both `wire_bytes` and what the kernel's TCP counters saw leave the process
(tcpi_bytes_acked summed over its sockets). Then DiLoCo trains with int4 and int2 through the real loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from distributed.compress import ExchangeState, exchange_simulated, wire_bytes
from tests.integration.test_ddp import finish, start_ranks
from tests.unit.test_compress_formats import reference, values

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
CASES = [("float32", 300_001), ("bfloat16", 70_001), ("float16", 70_001), ("int8", 70_001), ("int8-sum", 70_001),
         ("int8-gather", 70_001), ("int4", 70_001), ("int2", 70_001), ("int4", 300)]
SEED = 7

# One rank. argv: out_dir cases_json seed
RANK = r"""
import json, os, socket, struct, sys, time
from pathlib import Path
import mlx.core as mx
import numpy as np
from distributed.compress import ExchangeState, exchange
from tests.unit.test_compress_formats import values

def tcp_bytes_sent():
    # Payload bytes acknowledged on every TCP socket of this process (the ring's): struct tcp_info's
    # tcpi_bytes_acked, at offset 120 on Linux >= 4.1.
    total = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            s = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        try:
            if s.type == socket.SOCK_STREAM:
                total += struct.unpack_from("Q", s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232), 120)[0]
        except OSError:
            pass
        finally:
            s.close()
    return total

out, cases, seed = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
group = mx.distributed.init(backend="ring", strict=True)
rank, n = group.rank(), group.size()
report = []
for i, (dtype, size) in enumerate(cases):
    state = ExchangeState(rank=rank, seed=seed)
    x = mx.array(values(n, size, seed=size)[rank])
    for round_no, valid in enumerate([True, rank != 1]):
        before = tcp_bytes_sent()
        sent = exchange(x if valid else x * float("nan"), valid, group, dtype, state)
        mx.eval(sent.total, sent.count, *sent.arrays)
        # The last send may still sit in a socket buffer when this rank's part is done: poll until the
        # counters reach the count (an overcount shows as more), for at most 10 s.
        deadline = time.monotonic() + 10
        while tcp_bytes_sent() - before < sent.bytes_sent and time.monotonic() < deadline:
            time.sleep(0.005)
        np.save(out / f"total{rank}_{i}_{round_no}.npy", np.array(sent.total))
        report.append({"count": float(sent.count), "counted": sent.bytes_sent, "tcp": tcp_bytes_sent() - before})
(out / f"report{rank}.json").write_text(json.dumps(report))
"""


@pytest.mark.parametrize("world", [2, 3])
def test_formats_on_real_ranks_match_numpy_and_count_the_bytes_on_the_wire(tmp_path: Path, world: int) -> None:
    results = finish(start_ranks(RANK, [json.dumps(CASES), str(SEED)], tmp_path, world))
    for code, output in results:
        assert code == 0, output
    reports = [json.loads((tmp_path / f"report{r}.json").read_text()) for r in range(world)]
    for i, (dtype, size) in enumerate(CASES):
        xs = values(world, size, seed=size)
        states = [ExchangeState(rank=r, seed=SEED) for r in range(world)]
        for round_no, valid in enumerate([[True] * world, [r != 1 for r in range(world)]]):
            got = [np.load(tmp_path / f"total{r}_{i}_{round_no}.npy") for r in range(world)]
            # int2 adds each rank's residual (its last round's rounding errors) to what it sends.
            sent = [x + np.array(s.residual) if s.residual is not None else x for x, s in zip(xs, states, strict=True)]
            simulated = exchange_simulated([mx.array(x) for x in xs], valid, dtype, states)
            case = (dtype, size, round_no)
            for r in range(world):
                rep = reports[r][2 * i + round_no]
                assert np.array_equal(got[r], got[0]), case  # every rank holds the same sum
                assert rep["count"] == sum(valid), case
                assert rep["counted"] == wire_bytes(size, world, dtype, rank=r) == rep["tcp"], (case, r, rep)
            exact, bound = reference(sent, valid, dtype)
            err = np.abs(got[0].astype(np.float64) - exact)
            assert np.all(err <= bound), (case, float((err / bound).max()))
            if dtype.startswith("int"):  # integer sums are exact: the ranks ran the simulated code, same roundings
                assert np.array_equal(got[0], np.array(simulated[0].total)), case


# DiLoCo through the real training loop. argv: out_dir data_dir config_json dtype resume(0/1) stop_at
TRAIN = r"""
import hashlib, json, sys
from pathlib import Path
import mlx.core as mx
import numpy as np
from distributed.compress import ring_sum_bytes, wire_bytes
from distributed.config import config_from_dict
from distributed.diloco import DiLoCoStrategy
from distributed.train import train

out, data, cfg = Path(sys.argv[1]), Path(sys.argv[2]), config_from_dict(json.loads(sys.argv[3]))
dtype, resume, stop_at = sys.argv[4], sys.argv[5] == "1", int(sys.argv[6])
group = mx.distributed.init(backend="ring", strict=True)
rank, world = group.rank(), group.size()
seen = {}

def digest(a):
    return None if a is None else hashlib.sha256(np.array(a).tobytes()).hexdigest()

class Recorded(DiLoCoStrategy):
    def setup(self, model, *, rank, world_size):
        super().setup(model, rank=rank, world_size=world_size)
        seen["setup_bytes"] = self.bytes_sent
        seen["momentum_abs"] = float(mx.abs(self.momentum).sum())
        seen["momentum_hash"] = hashlib.sha256(np.array(self.momentum).tobytes()).hexdigest()

    def sync(self, model, optimizer, step):
        if "residual_first" not in seen:  # int2: what this rank resumed with (checkpoint or its rank state)
            seen["residual_first"] = digest(self.exchange_state.residual)
        before = self.bytes_sent
        super().sync(model, optimizer, step)
        seen.setdefault("sync_bytes", []).append(self.bytes_sent - before)

strategy = Recorded.from_config(group, cfg.strategy, log=lambda m: print(m, flush=True))
strategy.exchange_dtype = dtype
result = train(cfg, data_dir=data, run_dir=out / "run", rank=rank, world_size=world, strategy=strategy,
               resume=resume, stop_at=stop_at or None, log=lambda m: print(m, flush=True))
final = np.array(strategy.params)
p = int(final.size)
(out / f"train{rank}.json").write_text(json.dumps({
    **seen, "params": p, "loss": result.loss, "finite": bool(np.isfinite(final).all()),
    "hash": hashlib.sha256(final.tobytes()).hexdigest(), "residual": digest(strategy.exchange_state.residual),
    "expected_sync": wire_bytes(p, world, dtype, rank=rank), "vote": ring_sum_bytes(1, 4, world, rank),
    "momentum_bytes": ring_sum_bytes(p, 4, world, rank)}))
"""
H = 2
TINY = {
    "model": {"size": "tiny", "activation": "relu2"},
    "data": {"max_bytes": 60_000, "seq_len": 32, "val_share": 0.1},
    "train": {"steps": 3 * H, "batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1,
              "eval_interval": 0, "eval_batches": 1, "checkpoint_interval": H, "log_interval": H},
    "strategy": {"mode": "diloco", "inner_steps": H, "outer_lr": 0.7, "outer_momentum": 0.9},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distributed.config import config_from_dict
    from distributed.data import prepare_data

    out = tmp_path_factory.mktemp("data")
    prepare_data(config_from_dict(TINY).data, out)
    return out


def _train(out: Path, data_dir: Path, dtype: str, *, resume: bool, stop_at: int) -> list[dict]:
    args = [str(data_dir), json.dumps(TINY), dtype, "1" if resume else "0", str(stop_at)]
    for code, output in finish(start_ranks(TRAIN, args, out, 2)):
        assert code == 0, output
    return [json.loads((out / f"train{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("dtype", ["int4", "int2"])
def test_diloco_trains_with_the_ring_formats_and_sends_no_zero_momentum(tmp_path: Path, data_dir: Path,
                                                                        dtype: str) -> None:
    """A fresh start sends the weights and a 1-float vote, no momentum; a resume sends rank 0's momentum, and
    each rank takes back its own int2 residual (rank 0's from the checkpoint, rank 1's from its rank state)."""
    first = _train(tmp_path, data_dir, dtype, resume=False, stop_at=2 * H)
    for rep in first:
        assert rep["finite"] and np.isfinite(rep["loss"]) and (rep["residual"] is not None) == (dtype == "int2")
        assert rep["momentum_abs"] == 0.0
        assert rep["setup_bytes"] == 4 * rep["params"] + rep["vote"]  # weights (2 ranks: 4P) and the vote
        assert rep["sync_bytes"] == [rep["expected_sync"]] * 2  # counted at the collectives, per round
    assert first[0]["hash"] == first[1]["hash"]  # the outer state is bit-identical on both ranks
    second = _train(tmp_path, data_dir, dtype, resume=True, stop_at=0)  # from the checkpoint at step 4
    for rep, before in zip(second, first, strict=True):
        assert rep["residual_first"] == before["residual"]  # None for int4
        assert rep["momentum_abs"] > 0 and rep["momentum_hash"] == second[0]["momentum_hash"]
        assert rep["setup_bytes"] == 4 * rep["params"] + rep["vote"] + rep["momentum_bytes"]
        assert rep["sync_bytes"] == [rep["expected_sync"]]
    assert second[0]["hash"] == second[1]["hash"]
