"""What DDP and DiLoCo would cost in real rooms of Macs: the cost model (distributed/costmodel.py) fed with public
figures, for 2-4 Macs, three model sizes and three kinds of link. Arithmetic only; nothing is measured here.

    .venv/bin/python benchmarks/projection.py              # the table in benchmarks/README.md
    .venv/bin/python benchmarks/projection.py --macs 2 3 4 --markdown

Every number it rests on is a named constant below with its source or the assumption it is. The model:

* compute step (one rank, one optimizer step) = tokens per rank per step / tokens per second of one Mac;
* DDP step = compute + one ring allreduce of the float32 gradients (macrun's DDP does not overlap the two);
  communication share = allreduce / DDP step;
* DiLoCo: auto H = the smallest of 10, 20, 50, 100, 200, 500 with exposed exchange <= 10% of a round's
  compute (costmodel.choose_inner_steps, float32 exchange); time per step = compute + exchange / H; and the H
  the same rule picks with strategy.overlap, where only what outlasts the next round's H steps is exposed;
* speed-up = DDP step / DiLoCo's time per step: the same tokens per step, not the same loss; the loss DiLoCo
  gives up at that H is what benchmarks/diloco_vs_ddp.py and wifi_time_to_loss.py measure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file
    sys.path.insert(0, str(ROOT))

from distributed.costmodel import (  # noqa: E402
    DDP_MAX_SHARE,
    choose_inner_steps,
    exposed_seconds,
    format_seconds,
    ring_allreduce_seconds,
)

# Peak FP32 GPU throughput, Apple's own figures at each chip's launch (press releases): M2 Max 13.6 TFLOPS,
# M2 Ultra 27.2 TFLOPS.
M2_MAX_FLOPS = 13.6e12
M2_ULTRA_FLOPS = 27.2e12
# Assumed share of that peak a training step achieves in MLX (model FLOPs utilisation): an assumption, not a
# measurement; small GPTs on a GPU typically reach 30-50% of peak on their matmuls.
MFU = 0.35
# mlx-lm's LORA.md: Mistral-7B LoRA (batch 1, 4 layers) "on an M1 Max with 32 GB runs at about 250
# tokens-per-second". Taken as the 7B LoRA step's speed (more layers would be slower: conservative for DiLoCo).
LORA_7B_TOKENS_S = 250.0


@dataclass(frozen=True)
class Model:
    name: str
    trainable: int  # values that travel: all parameters, or a LoRA's adapters
    tokens_per_step: int  # per rank per optimizer step
    tokens_s: float  # one Mac's training throughput
    mac: str  # which Mac the throughput is for


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_bytes_s: float  # the link's TCP throughput when used alone
    latency_s: float
    shared: bool  # one medium for all stations (Wi-Fi): the ring's links split it

    def per_link(self, macs: int) -> float:
        """Bytes/s each ring link gets while all of them send at once, as a ring allreduce makes them."""
        # On Wi-Fi every frame between two stations crosses the air twice (station -> access point -> station)
        # and all stations take turns on one channel: each of the n ring links gets 1/(2n) of the goodput.
        return self.bandwidth_bytes_s / (2 * macs) if self.shared else self.bandwidth_bytes_s


def flops_tokens_s(params: float, peak: float) -> float:
    """Training tokens/s from 6 FLOPs per parameter per token (forward + backward, Kaplan et al. 2020)."""
    return peak * MFU / (6 * params)


MODELS = (
    # GPT-2 small, full training, 8 x 1024 tokens per rank per step, on an M2 Max.
    Model("GPT-2 124M full", 124_000_000, 8 * 1024, flops_tokens_s(124e6, M2_MAX_FLOPS), "M2 Max"),
    # A 1B model (Llama-3.2-1B size, 1.24B parameters), full training, 4 x 1024 tokens, on an M2 Ultra.
    Model("1B full", 1_240_000_000, 4 * 1024, flops_tokens_s(1.24e9, M2_ULTRA_FLOPS), "M2 Ultra"),
    # Mistral-7B LoRA with mlx-lm's defaults (rank 8 on every linear of the last 16 layers): 16 x
    # (q 8*(4096+4096) + k,v 2 * 8*(4096+1024) + o 8*(4096+4096) + gate,up,down 3 * 8*(4096+14336)) = 10.5M
    # trainable values; 4 x 512 tokens per step.
    Model("7B LoRA", 16 * (2 * 8 * 8192 + 2 * 8 * 5120 + 3 * 8 * 18432), 4 * 512, LORA_7B_TOKENS_S, "M1 Max"),
)
LINKS = (
    # Wi-Fi 6 (802.11ax, 2x2, 80 MHz): a few hundred Mbit/s of TCP per station near the access point; 500 assumed.
    Link("Wi-Fi 6", 500e6 / 8, 3e-3, shared=True),
    # 10 GbE through a switch: ~9.4 Gbit/s of TCP per port (line rate less headers), each link its own port.
    Link("10 GbE", 9.4e9 / 8, 100e-6, shared=False),
    # Thunderbolt 4 bridge, one cable per neighbour pair: 16.4 Gbit/s of TCP measured Mac -> PC over TB4/USB4
    # (jiribrejcha.net, "Direct 20 Gbps connection between Mac and Windows 11 machine", 2024); 16 assumed.
    Link("Thunderbolt 4", 16e9 / 8, 50e-6, shared=False),
)


@dataclass(frozen=True)
class Row:
    model: Model
    link: Link
    macs: int
    compute_s: float
    allreduce_s: float
    h: int
    diloco_step_s: float
    h_overlap: int  # auto H with strategy.overlap (the exchange travels during the next round)

    @property
    def ddp_step_s(self) -> float:
        return self.compute_s + self.allreduce_s

    @property
    def ddp_share(self) -> float:
        return self.allreduce_s / self.ddp_step_s

    @property
    def exposed(self) -> float:
        return exposed_seconds(self.allreduce_s, self.h, self.compute_s) / (self.h * self.compute_s)

    @property
    def exposed_overlap(self) -> float:
        return exposed_seconds(self.allreduce_s, self.h_overlap, self.compute_s, overlap=True) / (
            self.h_overlap * self.compute_s)

    @property
    def auto(self) -> str:
        return "DDP" if self.allreduce_s <= DDP_MAX_SHARE * self.compute_s else "DiLoCo"


def project(model: Model, link: Link, macs: int) -> Row:
    compute = model.tokens_per_step / model.tokens_s
    comm = ring_allreduce_seconds(model.trainable * 4, macs, link.per_link(macs), link.latency_s)
    h = choose_inner_steps(comm, compute)
    return Row(model, link, macs, compute, comm, h, compute + comm / h, choose_inner_steps(comm, compute, overlap=True))


HEAD = ("model (Mac)", "Macs", "link", "compute step", "allreduce", "DDP step (comm share)", "auto",
        "DiLoCo H (exposed)", "DiLoCo/DDP speed", "overlapped H (exposed)")


def cells(r: Row) -> tuple[str, ...]:
    return (f"{r.model.name} ({r.model.mac})", str(r.macs), r.link.name, format_seconds(r.compute_s),
            format_seconds(r.allreduce_s), f"{format_seconds(r.ddp_step_s)} ({r.ddp_share:.0%})", r.auto,
            f"{r.h} ({r.exposed:.1%})", f"{r.ddp_step_s / r.diloco_step_s:.2f}x",
            f"{r.h_overlap} ({r.exposed_overlap:.1%})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--macs", type=int, nargs="+", default=[2, 4])
    p.add_argument("--markdown", action="store_true", help="a Markdown table (as in benchmarks/README.md)")
    args = p.parse_args(argv)
    rows = [cells(project(m, link, n)) for m in MODELS for n in args.macs for link in LINKS]
    for m in MODELS:
        print(f"# {m.name}: {m.trainable / 1e6:.1f}M values travel ({m.trainable * 4 / 1e6:.0f} MB float32); "
              f"{m.tokens_per_step} tokens per rank per step at {m.tokens_s:,.0f} tokens/s on an {m.mac}")
    if args.markdown:
        print("| " + " | ".join(HEAD) + " |")
        print("|" + "---|" * len(HEAD))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return 0
    widths = [max(len(x) for x in col) for col in zip(HEAD, *rows, strict=True)]
    for row in (HEAD, *rows):
        print("  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
