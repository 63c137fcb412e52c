"""Reading a config file or a `--set` value that may be hostile: size, encoding, YAML errors and depth, numbers
too long for Python's int, values too deep or too big to print. Every failure is one ConfigError line.

The over-long number and the short `show` are shared with the hosts file's reader (launcher/room/hosts_parse.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from distributed.errors import ConfigError

# A config is a few hundred bytes; anything this big is the wrong file (a dataset, /dev/zero), not a config.
MAX_CONFIG_BYTES = 1 << 20
YAML_HINT = "a config has sections and keys, e.g. configs/quickstart.yaml; check the indentation and quoting"
_EXAMPLES = "pass one of the files in configs/, e.g. configs/quickstart.yaml"


class LongNumber:
    """An integer with more digits than Python turns into an int (its limit is 4,300): kept as its length, so
    the key it belongs to can be named in the error instead of a ValueError from deep in a parser."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"a {self.digits:,}-digit number"


def parse_int(text: str) -> int | LongNumber:
    """int(text), or a LongNumber when Python refuses that many digits (json.loads's `parse_int`)."""
    try:
        return int(text)
    except ValueError:
        return LongNumber(sum(c.isdigit() for c in text))


class _Loader(yaml.SafeLoader):
    """safe_load, except that an over-long integer becomes a LongNumber rather than a ValueError."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:  # type: ignore[override]
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            return LongNumber(sum(c.isdigit() for c in str(node.value)))


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """yaml.safe_load with over-long integers kept as LongNumber (YAMLError and RecursionError pass through)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def show(value: Any, limit: int = 60) -> str:
    """`value` as it appears in an error: its repr, cut short; never raises (a nested or huge value can)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int past Python's 4,300-digit limit, or deep nesting
        text = "(too large to print)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_config_file(p: Path) -> dict[str, Any]:
    """The mapping of sections a YAML config file holds; ConfigError naming the file for anything else."""
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found", hint=_EXAMPLES) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}", hint=_EXAMPLES) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: over {MAX_CONFIG_BYTES >> 20} MiB, too big to be a config",
                          hint=f"is it the right file? {_EXAMPLES}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a text file (byte {raw[exc.start]:#04x} at offset {exc.start} is not "
                          f"UTF-8)", hint=f"is it the right file? {_EXAMPLES}") from None
    try:
        data = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        if isinstance(exc, yaml.reader.ReaderError):
            where = f" (character U+{exc.character:04X} at offset {exc.position})" if isinstance(
                exc.character, int) else f" (character {exc.character!r} at offset {exc.position})"
        raise ConfigError(f"{p}: not valid YAML{where}", hint=YAML_HINT) from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply to be a config", hint=YAML_HINT) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections "
                          f"(run, model, data, finetune, train, strategy, fault)")
    return data
