"""Tiny random-weight language models in Hugging Face layout, for fine-tuning tests that never download.

`build_tiny_models(root)` writes, in a second or two:

- a BPE (byte-level) tokenizer trained here on generated sentences, saved as `tokenizer.json` and
  `tokenizer_config.json` with a small chat template (`<|user|>...<|end|><|assistant|>...<|end|>`);
- `llama/`: a 2-layer Llama (hidden 64, 4 heads, 2 key-value heads), `config.json` + `model.safetensors`;
- `qwen2/`: a 2-layer Qwen2 (hidden 32, attention biases), the second architecture mlx-lm supports;
- `llama-4bit/`: the Llama quantised to 4 bits (group size 32) with mlx-lm's own `quantize_model`.

Each folder is a few hundred KB and loads with `mlx_lm.load(folder)`. `write_dataset` writes a folder of
`train.jsonl`/`valid.jsonl` in one of mlx-lm's formats (text, chat, prompt/completion).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

SPECIALS = ["<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VOCAB = 384
WORDS = ("the a one two three four five six seven eight nine ten cat dog bird mat sat ran fast slow red blue green "
         "what is plus minus equals answer question model data train rank mac room small big hello world").split()

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
         "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2,
         "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": True}


def sentences(count: int, seed: int) -> list[str]:
    """`count` short generated sentences (deterministic in `seed`)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "." for _ in range(count)]


def train_tokenizer(out: Path) -> int:
    """Train and save the byte-level BPE tokenizer into `out`; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(2000, seed=1), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "pad_token": "<|eos|>", "model_max_length": 256, "chat_template": CHAT_TEMPLATE}, indent=2))
    return tok.get_vocab_size()


def _write_model(out: Path, config: dict, tokenizer_dir: Path, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Larger than MLX's default init on the embeddings so the random model's logits are not flat.
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.parameters()))
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)


def _quantize(src: Path, out: Path) -> None:
    from mlx_lm.utils import load, quantize_model, save

    model, tokenizer, config = load(str(src), return_config=True)
    model, qconfig = quantize_model(model, config, group_size=32, bits=4)
    save(out, src, model, tokenizer, qconfig, donate_model=False)


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Write the tokenizer and the three model folders under `root`; returns {name: folder}."""
    root = Path(root)
    vocab = train_tokenizer(root / "tokenizer")
    special = {"bos_token_id": SPECIALS.index("<|bos|>"), "eos_token_id": SPECIALS.index("<|eos|>")}
    folders = {"llama": root / "llama", "qwen2": root / "qwen2", "llama-4bit": root / "llama-4bit"}
    _write_model(folders["llama"], {**LLAMA, **special, "vocab_size": vocab}, root / "tokenizer", seed=1)
    _write_model(folders["qwen2"], {**QWEN2, **special, "vocab_size": vocab}, root / "tokenizer", seed=2)
    _quantize(folders["llama"], folders["llama-4bit"])
    return folders


def tiny_models(base: Path) -> dict[str, Path]:
    """`build_tiny_models` once per test session: `base` is pytest's session temp folder
    (`tmp_path_factory.getbasetemp()`), so the test modules that need the models share one build."""
    root = Path(base) / "tinyhf"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        build_tiny_models(root)
        done.touch()
    return {name: root / name for name in ("llama", "qwen2", "llama-4bit")}


def records(kind: str, count: int, seed: int) -> list[dict]:
    """`count` records of one of mlx-lm's formats: "text", "chat" or "completions"."""
    rng = random.Random(seed)
    out: list[dict] = []
    for _ in range(count):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question, answer = f"what is {a} plus {b}", f"the answer is {a + b}. " + " ".join(sentences(1, rng.random()))
        if kind == "text":
            out.append({"text": f"{question}? {answer}"})
        elif kind == "chat":
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
        else:
            out.append({"prompt": question, "completion": answer})
    return out


def write_dataset(out: Path, kind: str, train: int = 48, valid: int = 8, seed: int = 0) -> Path:
    """A data folder with `train.jsonl` and `valid.jsonl` of `kind` records; returns the folder."""
    out.mkdir(parents=True, exist_ok=True)
    for name, count, salt in (("train", train, 0), ("valid", valid, 1)):
        lines = [json.dumps(r) for r in records(kind, count, seed * 10 + salt)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def put_in_hf_cache(hub: Path, repo_id: str, src: Path, revision: str = "0" * 40, main: bool = True) -> Path:
    """Lay `src`'s files out as huggingface_hub's cache does under `hub` (blobs, symlinked snapshot files,
    refs/main naming `revision` when `main`); returns the snapshot folder."""
    import hashlib

    repo = Path(hub) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in Path(src).iterdir() if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(blob)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot
