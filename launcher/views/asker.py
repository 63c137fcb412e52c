"""The wizard's questions: asked with questionary on a terminal, or answered with their defaults under --yes."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape

from distributed.errors import ConfigError


class Asker:
    """The questions, asked with questionary, or answered with their defaults under --yes."""

    def __init__(self, console: Console, assume_yes: bool) -> None:
        self.console = console
        self.assume_yes = assume_yes

    def _ask(self, question: Any, message: str, answer: Any) -> Any:
        if self.assume_yes:
            shown = ", ".join(map(str, answer)) if isinstance(answer, list) else answer
            self.console.print(f"[bold]?[/] {escape(message)} [cyan]{escape(str(shown))}[/] (--yes)")
            return answer
        if not sys.stdin.isatty():
            raise ConfigError(f"cannot ask \"{message}\": no terminal",
                              hint="run it in a terminal, or pass --yes (with --select and --model) to skip questions")
        return question().unsafe_ask()  # unsafe: Ctrl-C raises KeyboardInterrupt instead of returning None

    def checkbox(self, message: str, choices: list[Any], ticked: list[str]) -> list[str]:
        import questionary

        return list(self._ask(lambda: questionary.checkbox(
            message, choices=choices, instruction="(space: tick/untick, enter: go on)",
            validate=lambda picked: bool(picked) or "tick at least one machine"), message, ticked))

    def select(self, message: str, choices: list[Any], default: Any) -> Any:
        import questionary

        return self._ask(lambda: questionary.select(message, choices=choices, default=default), message,
                         default.value if hasattr(default, "value") else default)

    def confirm(self, message: str, default: bool, yes_answer: bool | None = None) -> bool:
        import questionary

        answer = default if yes_answer is None else yes_answer
        return bool(self._ask(lambda: questionary.confirm(message, default=default), message, answer))

    def text(self, message: str, default: str = "") -> str:
        import questionary

        return str(self._ask(lambda: questionary.text(message, default=default), message, default)).strip()
