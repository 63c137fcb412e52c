"""Config loading: every shipped config loads; bad keys, types and ranges are named; overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.config import MODEL_SIZES, Config, describe_keys, load_config, parse_override
from distributed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty() -> None:
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "gpt2-small.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    layer, head, embd = cfg.model.dims()
    assert embd % head == 0
    assert cfg.train.steps >= 1


def test_defaults_without_a_file() -> None:
    cfg = load_config(None)
    assert cfg.strategy.outer_lr == 0.7 and cfg.strategy.outer_momentum == 0.9 and cfg.strategy.nesterov


def test_gpt2_small_preset_is_gpt2_layout() -> None:
    assert MODEL_SIZES["gpt2-small"] == (12, 12, 768)
    assert load_config(ROOT / "configs" / "gpt2-small.yaml").model.dims() == (12, 12, 768)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "fragments", "hint"),
    [
        ("train:\n  stpes: 10\n", ["unknown key 'train.stpes'"], "train.steps"),
        ("trian:\n  steps: 10\n", ["unknown key 'trian'"], "train"),
        ("model:\n  sise: tiny\n", ["unknown key 'model.sise'"], "model.size"),
        ("train:\n  steps: many\n", ["train.steps", "expected int", "'many'"], None),
        ("train:\n  steps: 0\n", ["train.steps", ">= 1"], None),
        ("train:\n  steps: 1.5\n", ["train.steps", "expected int"], None),
        ("train:\n  lr: -0.1\n", ["train.lr", "> 0.0"], None),
        ("train:\n  lr: .nan\n", ["train.lr", "finite"], None),
        ("train:\n  batch_size: true\n", ["train.batch_size", "expected int"], None),
        ("model:\n  size: enormous\n", ["model.size", "'enormous'", "gpt2-small"], None),
        ("strategy:\n  mode: fast\n", ["strategy.mode", "auto, ddp, diloco"], None),
        ("strategy:\n  exchange_dtype: int4\n", ["strategy.exchange_dtype", "int8"], None),
        ("data:\n  val_share: 0\n", ["data.val_share", "> 0.0"], None),
        ("data:\n  val_share: 0.9\n", ["data.val_share", "<= 0.5"], None),
        ("model:\n  n_head: 3\n  n_embd: 64\n", ["n_embd (64) must be a multiple of model.n_head (3)"], None),
        ("train:\n  lr: 0.001\n  min_lr: 0.01\n", ["train.min_lr"], None),
        ("train: 5\n", ["train", "expected a mapping"], None),
        ("- a\n- b\n", ["top level must be a mapping"], None),
        ("train: [unclosed\n", ["not valid YAML", "line"], None),
        ("run:\n  name: a/b\n", ["run.name"], None),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, text: str, fragments: list[str], hint: str | None) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    if hint:
        assert hint in (info.value.hint or "")
    assert info.value.exit_code == 2


def test_missing_file_has_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "not found" in str(info.value) and "configs/" in (info.value.hint or "")


def test_overrides_beat_yaml_and_are_typed(tmp_path: Path) -> None:
    path = _write(tmp_path, "train:\n  steps: 10\n  lr: 0.01\n")
    cfg = load_config(path, ["train.steps=200", "strategy.nesterov=false", "model.size=small"])
    assert cfg.train.steps == 200 and cfg.train.lr == 0.01
    assert cfg.strategy.nesterov is False
    assert cfg.model.dims() == MODEL_SIZES["small"]


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads 3e-3 as a string; users write it that way on the command line and in files.
    assert load_config(None, ["train.lr=3e-3"]).train.lr == pytest.approx(3e-3)
    assert load_config(_write(tmp_path, "train:\n  lr: 1e-3\n  min_lr: 1e-4\n")).train.min_lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("text", ["train.steps", "steps=5", "a.b.c=1", ".steps=1"])
def test_malformed_overrides(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_override(text)


def test_override_with_unknown_key_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.step=5"])
    assert "train.steps" in (info.value.hint or "")


def test_every_key_has_help() -> None:
    rows = describe_keys()
    assert len(rows) > 30
    assert all(help_text for _key, help_text, _default in rows)
