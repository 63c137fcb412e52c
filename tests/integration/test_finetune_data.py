"""Fine-tuning data: mlx-lm's three JSONL formats tokenised as mlx-lm does, the loss mask, the shards, the errors.

The tokenizer is a real one (a byte-level BPE trained by tests/support/tinyhf.py, with a chat template);
tokenising goes through mlx-lm's own dataset classes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distributed.config import Config, config_from_dict
from distributed.errors import ConfigError, DataError
from distributed.sft_data import Examples, ExampleSampler, eval_batches, prepare_finetune_data
from tests.support.tinyhf import LLAMA, SPECIALS, train_tokenizer, write_dataset

SEQ = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the tokenizer and a config.json: all that tokenising needs (no weights)."""
    out = tmp_path_factory.mktemp("model")
    vocab = train_tokenizer(out)
    (out / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": vocab, "eos_token_id": 1}))
    return out


def cfg_for(model: Path | str, data: Path | str, **data_keys: object) -> Config:
    return config_from_dict({"model": {"source": "mlx-lm", "path": str(model)},
                             "data": {"path": str(data), "seq_len": SEQ, **data_keys}})


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):  # noqa: ANN201 - mlx-lm's TokenizerWrapper
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(model_dir)


def _targets_counted(examples: Examples, i: int) -> np.ndarray:
    _, targets, mask = examples.batch(np.array([i]))
    return targets[0][mask[0] > 0]


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_chat_and_completions_count_only_the_answer(tmp_path: Path, model_dir: Path, tokenizer, kind: str) -> None:
    data = write_dataset(tmp_path / "d", kind, train=6, valid=2)
    prepared = prepare_finetune_data(cfg_for(model_dir, data, seq_len=256), tmp_path / "out")
    assert prepared.format == kind and prepared.masked and prepared.examples == {"train": 6, "valid": 2}
    assert f"({kind}, completion-only loss)" in prepared.describe()
    examples = Examples(prepared.dir, "train", 256)
    first = json.loads((data / "train.jsonl").read_text().splitlines()[0])
    answer = first["messages"][1]["content"] if kind == "chat" else first["completion"]
    # What the loss sees is the assistant's answer and the template's end marker, nothing of the question.
    assert tokenizer.decode(_targets_counted(examples, 0).tolist()) == answer + "<|end|>"


def test_text_counts_every_token_and_ends_with_eos(tmp_path: Path, model_dir: Path, tokenizer) -> None:
    data = write_dataset(tmp_path / "d", "text", train=4, valid=0)
    (data / "valid.jsonl").unlink()
    prepared = prepare_finetune_data(cfg_for(model_dir, data, seq_len=256), tmp_path / "out")
    assert prepared.format == "text" and not prepared.masked and prepared.examples["valid"] == 0
    assert "no valid.jsonl" in prepared.describe()
    text = json.loads((data / "train.jsonl").read_text().splitlines()[0])["text"]
    counted = _targets_counted(Examples(prepared.dir, "train", 256), 0).tolist()
    assert counted[-1] == SPECIALS.index("<|eos|>")  # mlx-lm's TextDataset appends the end-of-sequence token
    assert tokenizer.decode(counted[:-1]) == tokenizer.decode(tokenizer.encode(text)[1:])
    assert eval_batches(prepared.dir, 256, 2, 4) == []


def test_mask_prompt_false_trains_on_the_whole_chat(tmp_path: Path, model_dir: Path) -> None:
    data = write_dataset(tmp_path / "d", "chat", train=3, valid=1)
    prepared = prepare_finetune_data(cfg_for(model_dir, data, mask_prompt=False, seq_len=256), tmp_path / "out")
    examples = Examples(prepared.dir, "train", 256)
    assert not prepared.masked and examples.loss_tokens[0] == examples.lengths[0] - 1


def test_long_examples_are_cut_to_seq_len_and_batches_padded(tmp_path: Path, model_dir: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    long = " ".join(["seven eight nine"] * 40)
    (data / "train.jsonl").write_text(json.dumps({"text": long}) + "\n" + json.dumps({"text": "hello"}) + "\n")
    prepared = prepare_finetune_data(cfg_for(model_dir, data), tmp_path / "out")
    examples = Examples(prepared.dir, "train", SEQ)
    assert prepared.tokens["train"] > SEQ + 1 and examples.lengths[0] == SEQ + 1
    assert f"1 longer than data.seq_len={SEQ} are cut" in prepared.describe()
    inputs, targets, mask = examples.batch(np.array([0, 1]))
    assert inputs.shape == (2, SEQ) and mask[0].sum() == SEQ
    assert np.array_equal(inputs[0, 1:], targets[0, :-1])  # targets are the inputs shifted by one
    assert mask[1].sum() == examples.lengths[1] - 1 and not mask[1, int(examples.lengths[1]) - 1:].any()
    short = Examples(prepared.dir, "train", 256).batch(np.array([1]))[0]
    assert short.shape == (1, 32)  # padded to a multiple of 32, not to seq_len


def test_prepare_is_idempotent_and_redone_when_the_data_changes(tmp_path: Path, model_dir: Path) -> None:
    data = write_dataset(tmp_path / "d", "chat", train=4, valid=1)
    cfg = cfg_for(model_dir, data)
    prepare_finetune_data(cfg, tmp_path / "out")
    before = (tmp_path / "out" / "train.tokens.npy").stat().st_mtime_ns
    prepare_finetune_data(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "train.tokens.npy").stat().st_mtime_ns == before
    write_dataset(data, "chat", train=5, valid=1)
    assert prepare_finetune_data(cfg, tmp_path / "out").examples["train"] == 5


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("shards")
    data = write_dataset(tmp / "d", "completions", train=30, valid=3)
    return prepare_finetune_data(cfg_for(model_dir, data), tmp / "out").dir


def test_ranks_take_disjoint_examples_and_one_step_is_one_global_batch(prepared_dir: Path) -> None:
    world, batch = 3, 2
    samplers = [ExampleSampler(prepared_dir, SEQ, batch, r, world, seed=5) for r in range(world)]
    per_epoch = samplers[0].steps_per_epoch
    seen = np.concatenate([s.item_ids(step) for step in range(per_epoch) for s in samplers])
    assert len(seen) == len(set(seen.tolist())) == per_epoch * batch * world  # no example twice in an epoch
    single = ExampleSampler(prepared_dir, SEQ, batch * world, 0, 1, seed=5)
    for step in range(per_epoch):
        assert np.array_equal(np.concatenate([s.item_ids(step) for s in samplers]), single.item_ids(step))


def test_ddp_scale_makes_the_mean_of_rank_gradients_the_global_token_mean(prepared_dir: Path) -> None:
    world = 2
    samplers = [ExampleSampler(prepared_dir, SEQ, 3, r, world, seed=1) for r in range(world)]
    for step in range(4):
        batches = [s.batch(step) for s in samplers]
        # Averaging the ranks' (scale x summed loss) weighs every loss token of the step by 1/(its count).
        weight = sum(float(b[3]) * float(b[2].sum()) for b in batches) / world
        assert weight == pytest.approx(1.0, rel=1e-6)
    local = ExampleSampler(prepared_dir, SEQ, 3, 0, world, seed=1, global_mean=False).batch(0)
    assert float(local[3]) * float(local[2].sum()) == pytest.approx(1.0, rel=1e-6)


def test_resume_with_another_world_continues_the_stream(prepared_dir: Path) -> None:
    two = [ExampleSampler(prepared_dir, SEQ, 2, r, 2, seed=3) for r in range(2)]
    stream = np.concatenate([s.item_ids(step) for step in range(6) for s in two])
    # Stopped after step 2 with 2 ranks (8 examples consumed), resumed on 1 rank.
    one = ExampleSampler(prepared_dir, SEQ, 2, 0, 1, seed=3, start_step=2, start_position=two[0].position(2))
    resumed = np.concatenate([one.item_ids(step) for step in range(2, 10)])
    assert np.array_equal(resumed, stream[8:24])


@pytest.mark.parametrize(("setup", "needle"), [
    (lambda d: None, "has no train.jsonl"),
    (lambda d: (d / "train.jsonl").write_text('{"text": "a"}\n{not json\n'), "line 2 is not valid JSON"),
    (lambda d: (d / "train.jsonl").write_text('{"question": "a"}\n'), "in none of mlx-lm's formats"),
    (lambda d: (d / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n'),
     "line 2 lacks 'prompt' and 'completion'"),
    (lambda d: (d / "train.jsonl").write_text("\n"), "holds no records"),
], ids=["no-train", "bad-json", "unknown-format", "missing-key", "empty"])
def test_bad_data_is_one_data_error(tmp_path: Path, model_dir: Path, setup, needle: str) -> None:
    data = tmp_path / "d"
    data.mkdir()
    setup(data)
    with pytest.raises(DataError, match=needle) as info:
        prepare_finetune_data(cfg_for(model_dir, data), tmp_path / "out")
    assert info.value.hint


def test_chat_records_need_a_chat_template(tmp_path: Path, model_dir: Path) -> None:
    plain = tmp_path / "plain-model"
    shutil.copytree(model_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_dataset(tmp_path / "d", "chat", train=2, valid=1)
    with pytest.raises(DataError, match="need a chat template") as info:
        prepare_finetune_data(cfg_for(plain, data), tmp_path / "out")
    assert "text records" in (info.value.hint or "")


def test_unset_or_missing_paths_are_named(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(DataError, match="data.path is not set"):
        prepare_finetune_data(cfg_for(model_dir, ""), tmp_path / "out")
    data = write_dataset(tmp_path / "d", "text", train=2, valid=1)
    with pytest.raises(ConfigError, match="model.path is not set") as info:
        prepare_finetune_data(cfg_for("", data), tmp_path / "out")
    assert "mlx-community/" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="does not exist"):
        prepare_finetune_data(cfg_for(tmp_path / "nowhere", data), tmp_path / "out")
    with pytest.raises(ConfigError, match="no config.json"):
        prepare_finetune_data(cfg_for(data, data), tmp_path / "out")
