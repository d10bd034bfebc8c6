"""`sdbuild doctor`: is this environment able to build (this recipe)? One line per check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Check:
    """One finding. `note` is something worth knowing that needs no fixing (e.g. no Mac to compile on)."""

    name: str
    status: Literal["ok", "note", "fail"]
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status.upper() if self.status == 'fail' else self.status:<5} {self.name}: {self.detail}"
        return text + (f" (fix: {self.fix})" if self.fix else "")
