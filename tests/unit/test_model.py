"""Unit tests for the built-in byte-level GPT (distributed/models/gpt.py), on tiny dimensions."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from distributed.config import ModelConfig
from distributed.models.gpt import GPT, VOCAB_SIZE, build_model, count_params, estimate_memory_bytes, loss_fn

TINY = ModelConfig(size="tiny", n_layer=2, n_head=2, n_embd=32)


def _tokens(seed: int, shape: tuple[int, int]) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, VOCAB_SIZE, size=shape), dtype=mx.int32)


def test_output_shape_and_dtype() -> None:
    model = build_model(TINY, block_size=16, seed=0)
    logits = model(_tokens(0, (3, 16)))
    assert logits.shape == (3, 16, VOCAB_SIZE)
    assert logits.dtype == mx.float32
    # Shorter sequences than block_size work too.
    assert model(_tokens(1, (2, 5))).shape == (2, 5, VOCAB_SIZE)


def test_longer_than_block_size_is_refused() -> None:
    model = build_model(TINY, block_size=8, seed=0)
    with pytest.raises(ValueError, match="block_size"):
        model(_tokens(0, (1, 9)))


def test_causality() -> None:
    model = build_model(TINY, block_size=16, seed=0)
    x = _tokens(2, (2, 16))
    t = 7
    changed = np.array(x)
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % VOCAB_SIZE
    a, b = np.array(model(x)), np.array(model(mx.array(changed)))
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=1e-5, atol=1e-5)
    # ... while the later positions, which do see the change, differ.
    assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max() > 1e-3


def test_same_seed_same_weights_other_seed_different() -> None:
    a = dict(tree_flatten(build_model(TINY, 16, seed=3).parameters()))
    # Disturb the global RNG in between: initialisation must depend on the seed only.
    mx.random.uniform(shape=(100,))
    b = dict(tree_flatten(build_model(TINY, 16, seed=3).parameters()))
    c = dict(tree_flatten(build_model(TINY, 16, seed=4).parameters()))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert mx.array_equal(a[k], b[k]), k
    assert not mx.array_equal(a["wte.weight"], c["wte.weight"])
    assert not mx.array_equal(a["blocks.1.mlp.fc.weight"], c["blocks.1.mlp.fc.weight"])


def test_init_scales() -> None:
    model = build_model(ModelConfig(size="tiny", n_layer=8, n_head=2, n_embd=64), 16, seed=0)
    p = dict(tree_flatten(model.parameters()))
    assert abs(float(p["blocks.0.mlp.fc.weight"].std()) - 0.02) < 0.002
    assert abs(float(p["blocks.0.mlp.proj.weight"].std()) - 0.02 / math.sqrt(16)) < 0.0005
    assert mx.array_equal(p["blocks.3.ln1.weight"], mx.ones(64))
    assert mx.array_equal(p["ln_f.bias"], mx.zeros(64))


def test_initial_loss_is_near_uniform_and_overfitting_drives_it_down() -> None:
    mx.random.seed(0)
    model = build_model(TINY, block_size=16, seed=0)
    x_np = np.random.default_rng(5).integers(0, VOCAB_SIZE, size=(4, 17))
    x, y = mx.array(x_np[:, :-1], dtype=mx.int32), mx.array(x_np[:, 1:], dtype=mx.int32)
    first = float(loss_fn(model, x, y))
    assert abs(first - math.log(VOCAB_SIZE)) < 0.1

    opt = optim.AdamW(learning_rate=1e-2, weight_decay=0.0)
    grad_fn = nn.value_and_grad(model, loss_fn)
    # Not mx.compile'd: on Linux CPU the first compiled call JIT-builds C++, slower than 50 plain steps.
    for _ in range(50):
        _, grads = grad_fn(model, x, y)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    final = float(loss_fn(model, x, y))
    assert final < 0.3 * math.log(VOCAB_SIZE), (first, final)


def test_count_params_matches_hand_count() -> None:
    n_layer, n_embd, block = 2, 32, 16
    model = GPT(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block)
    per_block = (
        3 * n_embd * n_embd + n_embd * n_embd  # qkv + attention output projection
        + 4 * n_embd * n_embd * 2  # MLP up and down
        + 2 * 2 * n_embd  # two LayerNorms, weight + bias
    )
    expected = VOCAB_SIZE * n_embd + block * n_embd + n_layer * per_block + 2 * n_embd
    assert count_params(model) == expected
    # Tied output layer: there is no separate lm_head matrix.
    assert not any("head" in k for k, _ in tree_flatten(model.parameters()))


def test_gpt2_small_layout_is_about_85m_non_embedding() -> None:
    # GPT() without build_model leaves the weights unevaluated (lazy), so this costs no compute.
    n_layer, n_head, n_embd = ModelConfig(size="gpt2-small").dims()
    model = GPT(n_layer, n_head, n_embd, block_size=1024)
    embedding = (VOCAB_SIZE + 1024) * n_embd
    assert 84e6 < count_params(model) - embedding < 86e6


def test_estimate_memory_grows_with_model_and_batch() -> None:
    small = estimate_memory_bytes(ModelConfig(size="tiny"), 128, 8)
    assert small > 16 * 180_000  # at least weights + grads + two moments in fp32
    assert estimate_memory_bytes(ModelConfig(size="tiny"), 128, 16) > small
    assert estimate_memory_bytes(ModelConfig(size="small"), 128, 8) > small


def test_dropout_zero_is_deterministic_in_train_mode() -> None:
    model = build_model(TINY, 16, seed=0)
    model.train()
    x = _tokens(9, (2, 16))
    assert mx.array_equal(model(x), model(x))
