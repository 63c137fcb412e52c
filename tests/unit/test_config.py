"""Config loading: every shipped config loads; bad keys, types and ranges are named; overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from distributed.config import MODEL_SIZES, Config, describe_keys, load_config, parse_override, validate_run_name
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
    # DiLoCo's outer step is chosen by H unless set (distributed/diloco.py, default_outer_step).
    assert cfg.strategy.outer_lr == 0.0 and cfg.strategy.outer_momentum == 0.9 and cfg.strategy.nesterov


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
        ("strategy:\n  exchange_dtype: int3\n", ["strategy.exchange_dtype", "int8"], None),
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


# ---- hostile input: one ConfigError naming the file and the key, never a traceback --------------------------


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["not a text file", "0x89 at offset 0"]),
        (b"[" * 5000, ["nested too deeply"]),
        (b"run:\n  seed: " + b"9" * 5001, ["run.seed", "5,001-digit number is too large"]),
        (b"run:\n  seed: 0x" + b"f" * 5000, ["run.seed", "20,000-bit number is too large"]),
        (b"train:\n  lr: 0x" + b"f" * 300, ["train.lr", "too large"]),  # float() of it would overflow
        (b"? 0x" + b"f" * 5000 + b"\n: 1\n", ["unknown key", "too large to print"]),  # an explicit key
        (b"run:\n  name: [0x" + b"f" * 5000 + b"]\n", ["run.name", "expected str", "too large to print"]),
    ],
    ids=["png", "deep", "long-int", "huge-hex", "float-overflow", "huge-key", "huge-in-list"],
)
def test_hostile_config_files_are_one_config_error(tmp_path: Path, content: bytes, fragments: list[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 200
    for fragment in fragments:
        assert fragment in message
    assert info.value.hint and info.value.exit_code == 2


def test_a_file_too_big_to_be_a_config_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"# x\n" * (1 << 19))  # 2 MiB of valid YAML
    with pytest.raises(ConfigError, match="too big to be a config"):
        load_config(path)


@pytest.mark.parametrize(("override", "fragment"), [
    ("train.steps=" + "[" * 5000, "--set train.steps: the value is nested too deeply"),
    ("train.steps=" + "9" * 5001, "train.steps: a 5,001-digit number is too large"),
    ("train.steps=" + str(2**63), "train.steps: a 64-bit number is too large"),
])
def test_hostile_overrides_are_one_config_error(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value) and len(str(info.value)) < 200 and info.value.hint


def test_type_errors_carry_the_keys_help_as_hint() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.steps=many"])
    assert "Optimizer steps" in (info.value.hint or "")


# ---- run names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart", "gpt2-small", "run_2", "v1.2", "my run", "été-ü", "a" * 100, ".x"])
def test_validate_run_name_accepts_folder_names(name: str) -> None:
    assert validate_run_name(name) == name
    assert validate_run_name(name, what="--name") == name


@pytest.mark.parametrize(("name", "fragment"), [
    ("", "is empty"),
    ("   ", "is empty"),
    (".", "current folder"),
    ("..", "folder above"),
    ("/tmp/x", "not a path"),
    ("/", "not a path"),
    ("../escape", "not a path"),
    ("a/b", "not a path"),
    ("a\\b", "not a path"),
    ("-rf", "start with '-'"),
    (" lead", "starts or ends with a space"),
    ("trail ", "starts or ends with a space"),
    ("a\nb", "U+000A"),
    ("tab\t", "U+0009"),
    ("nul\x00", "U+0000"),
    ("esc\x1b[31m", "U+001B"),
    ("bidi\u202etxt", "U+202E"),
    ("a" * 101, "101 characters"),
    ("é" * 101, "101 characters"),
    ("\U0001f600" * 51, "204 bytes"),
])
def test_validate_run_name_refuses_what_is_not_one_folder(name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_run_name(name, what="--name")
    message = str(info.value)
    assert message.startswith("--name: ") and fragment in message
    assert "\n" not in message and len(message) < 160 and info.value.hint and info.value.exit_code == 2


def test_validate_run_name_refuses_a_non_string() -> None:
    with pytest.raises(ConfigError, match="run.name: expected a name"):
        validate_run_name(5)  # type: ignore[arg-type]


def test_run_name_in_a_config_goes_through_validate_run_name() -> None:
    with pytest.raises(ConfigError, match=r"run\.name: '\.\.' names the folder above"):
        load_config(None, ["run.name=.."])
    with pytest.raises(ConfigError, match="U\\+0007"):
        load_config(None, ['run.name="bell\\a"'])
