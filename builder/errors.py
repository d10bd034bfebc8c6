"""Errors the user can act on. The CLI prints them as one block and exits non-zero, no traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake or a missing prerequisite that the user can fix; `hint` says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class RecipeError(UserError):
    """A problem in a recipe file, located by file, line and dotted field path."""

    def __init__(
        self,
        file: Path | str,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, hint)
        self.file = str(file)
        self.line = line
        self.field = field

    def render(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        head = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        text = f"error: {head}"
        if self.hint:
            text += f"\n  fix: {self.hint}"
        return text


class RecipeErrors(UserError):
    """Several recipe problems found at once, reported together."""

    def __init__(self, errors: list[RecipeError]):
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors

    def render(self) -> str:
        return "\n".join(e.render() for e in self.errors)


class StageFailed(UserError):
    """A stage raised or its worker died; the log tail says why. Nothing already cached is lost.

    `expected` is true when the stage itself reported a UserError (e.g. weights that cannot be
    fetched): the message is then the whole story and no log tail is attached.
    """

    def __init__(self, message: str, hint: str | None = None, *, stage_id: str | None = None, expected: bool = False):
        super().__init__(message, hint)
        self.stage_id = stage_id
        self.expected = expected


class EnvironmentFault(UserError):
    """The machine, not the input, stopped the work: no space left, a read-only or unwritable folder,
    a name the file system cannot hold. Says what was being done, where, and (for a full disk) how
    much space was needed and is free. Whatever was already built is kept."""


def first_line(error: BaseException) -> str:
    """An unexpected library error as one line for the user: its type and its message's first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
