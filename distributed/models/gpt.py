"""A byte-level GPT in MLX: the built-in model that macrun trains.

The layout follows GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask
Learners"): pre-norm blocks with LayerNorm, causal multi-head self-attention, a 4x GELU MLP, learned
positional embeddings, a final LayerNorm and an output layer tied to the token embedding. The
vocabulary is the 256 byte values, so no tokenizer is needed. Linear layers have no biases.

    model = build_model(ModelConfig(size="tiny"), block_size=128, seed=0)
    loss = loss_fn(model, x, y)      # x, y: int32 (B, T)
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from distributed.config import ModelConfig

VOCAB_SIZE = 256
INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t."""

    def __init__(self, n_head: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, c = x.shape
        q, k, v = mx.split(self.qkv(x), 3, axis=-1)
        # (B, T, C) -> (B, H, T, C/H), the layout the fused kernel expects.
        q, k, v = (a.reshape(b, t, self.n_head, -1).transpose(0, 2, 1, 3) for a in (q, k, v))
        scale = 1.0 / math.sqrt(c // self.n_head)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        y = y.transpose(0, 2, 1, 3).reshape(b, t, c)
        return self.resid_dropout(self.proj(y))


def relu2(x: mx.array) -> mx.array:
    """Squared ReLU (So et al. 2021, "Primer", arXiv 2109.08668): no transcendental functions, which
    MLX's Linux CPU build evaluates ~30x slower than a multiply."""
    r = nn.relu(x)
    return r * r


ACTIVATIONS = {"gelu": nn.gelu, "relu2": relu2}


class MLP(nn.Module):
    """The position-wise feed-forward layer: n_embd -> 4*n_embd -> activation -> n_embd."""

    def __init__(self, n_embd: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_head: int, n_embd: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_head, n_embd, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout, activation)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer over bytes; `__call__` maps int32 tokens (B, T) to logits (B, T, 256)."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.n_layer = n_layer
        self.wte = nn.Embedding(VOCAB_SIZE, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = [Block(n_head, n_embd, dropout, activation) for _ in range(n_layer)]
        self.ln_f = nn.LayerNorm(n_embd)

    def __call__(self, tokens: mx.array) -> mx.array:
        t = tokens.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than block_size {self.block_size}")
        h = self.drop(self.wte(tokens) + self.wpe(mx.arange(t)))
        for block in self.blocks:
            h = block(h)
        # Weight tying (Press & Wolf, 2017): the output layer reuses the token embedding.
        return self.wte.as_linear(self.ln_f(h))


def init_weights(model: GPT, seed: int) -> None:
    """GPT-2 initialisation, drawn from an explicit PRNG key so it depends on `seed` alone.

    Weights ~ N(0, 0.02); the projections that write into the residual stream (attn.proj, mlp.proj)
    are scaled by 1/sqrt(2 * n_layer) so the residual's variance does not grow with depth (GPT-2).
    LayerNorm scales start at 1, its biases at 0.
    """
    names = [name for name, _ in tree_flatten(model.parameters())]
    keys = dict(zip(names, mx.random.split(mx.random.key(seed), len(names)), strict=True))
    resid_std = INIT_STD / math.sqrt(2 * model.n_layer)

    def draw(name: str, p: mx.array) -> mx.array:
        leaf = name.rsplit(".", 1)[-1]
        if ".ln" in name or name.startswith("ln_"):
            return mx.ones_like(p) if leaf == "weight" else mx.zeros_like(p)
        std = resid_std if name.endswith(".proj.weight") else INIT_STD
        return mx.random.normal(p.shape, dtype=p.dtype, key=keys[name]) * std

    model.update(tree_map_with_path(draw, model.parameters()))


def build_model(model_cfg: ModelConfig, block_size: int, seed: int) -> GPT:
    """Build a GPT from a config with weights that depend only on `seed`; parameters are evaluated.

    MLX's global RNG is also seeded with `seed`, so that dropout masks are reproducible too.
    """
    n_layer, n_head, n_embd = model_cfg.dims()
    mx.random.seed(seed)
    model = GPT(n_layer, n_head, n_embd, block_size, dropout=model_cfg.dropout, activation=model_cfg.activation)
    init_weights(model, seed)
    mx.eval(model.parameters())
    return model


def loss_fn(model: GPT, x: mx.array, y: mx.array) -> mx.array:
    """Mean next-byte cross-entropy (nats) of `model` on inputs x and targets y, both int32 (B, T)."""
    logits = model(x)
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def count_params(model: nn.Module) -> int:
    """Number of parameters; the tied embedding/output matrix is one parameter and is counted once."""
    return sum(p.size for _, p in tree_flatten(model.parameters()))


def estimate_memory_bytes(model_cfg: ModelConfig, block_size: int, batch_size: int) -> int:
    """A rough upper estimate of the memory one rank needs to train the model, in bytes.

    With P parameters, L layers, width C, H heads, batch B and sequence length T (= block_size):

        state       = 4 * P * 4 bytes      fp32 weights, gradients, AdamW's first and second moments
        activations = L * B * T * (34*C + 5*H*T) * 2 bytes + 2 * B * T * 256 * 4 bytes

    The per-layer term is Korthikanti et al. (2022), "Reducing Activation Recomputation in Large
    Transformer Models", sbh(34 + 5as/h) bytes for 16-bit activations, doubled here for fp32; the last
    term holds the logits and their gradient. Framework overhead and temporaries are not included.
    """
    n_layer, n_head, n_embd = model_cfg.dims()
    params = (
        VOCAB_SIZE * n_embd + block_size * n_embd  # token and position embeddings
        + n_layer * (12 * n_embd * n_embd + 4 * n_embd)  # attention + MLP + two LayerNorms
        + 2 * n_embd  # final LayerNorm
    )
    state = 4 * params * 4
    tokens = batch_size * block_size
    activations = n_layer * tokens * (34 * n_embd + 5 * n_head * block_size) * 2
    logits = 2 * tokens * VOCAB_SIZE * 4
    return state + activations + logits
