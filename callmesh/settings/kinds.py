"""What a setting's value may be: parsing from text and checking a typed value.

A kind raises :class:`ValueError` with a short reason ("not an integer", "must be >= 0");
the loader turns it into a :class:`ConfigError` naming the variable or flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or out of range."""


@dataclass(frozen=True)
class Number:
    """An int or a float within optional bounds (``gt`` excludes its bound, ``ge`` keeps it)."""

    type: type[int] | type[float]
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def parse(self, text: str) -> Any:
        try:
            value = self.type(text.strip())
        except ValueError:
            raise ValueError(f"not {'an integer' if self.type is int else 'a number'}") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        wrong = isinstance(value, bool) or not isinstance(value, (int, float))
        if wrong or (self.type is int and isinstance(value, float)):
            raise ValueError(f"not {'an integer' if self.type is int else 'a number'}")
        self._bounds(float(value))

    def _bounds(self, value: float) -> None:
        if value != value:  # NaN passes every comparison below
            raise ValueError("not a number")
        if self.ge is not None and value < self.ge:
            raise ValueError(f"must be >= {_num(self.ge)}")
        if self.gt is not None and value <= self.gt:
            raise ValueError(f"must be > {_num(self.gt)}")
        if self.le is not None and value > self.le:
            raise ValueError(f"must be <= {_num(self.le)}")

    def describe(self) -> str:
        name = "integer" if self.type is int else "number"
        bounds = [f">= {_num(self.ge)}" if self.ge is not None else ""]
        bounds.append(f"> {_num(self.gt)}" if self.gt is not None else "")
        bounds.append(f"<= {_num(self.le)}" if self.le is not None else "")
        return " ".join([name, ", ".join(b for b in bounds if b)]).strip()


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class Text:
    """Free text, or text matching ``pattern`` (``what`` says what the pattern means)."""

    pattern: str = ""
    what: str = "text"
    empty_ok: bool = True

    def parse(self, text: str) -> str:
        self.check(text)
        return text

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise ValueError("not text")
        if not value:
            if not self.empty_ok:
                raise ValueError("must not be empty")
            return
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ValueError(f"must be {self.what}")

    def describe(self) -> str:
        return self.what


@dataclass(frozen=True)
class Url:
    """A URL with one of ``schemes``; empty means "not set" when ``empty_ok``."""

    schemes: tuple[str, ...]
    empty_ok: bool = False

    def parse(self, text: str) -> str:
        self.check(text)
        return text

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise ValueError("not a URL")
        if not value and self.empty_ok:
            return
        if not value.startswith(tuple(f"{s}://" for s in self.schemes)):
            raise ValueError(f"must be a {self._schemes()} URL")

    def _schemes(self) -> str:
        return " or ".join(f"{s}://" for s in self.schemes)

    def describe(self) -> str:
        return f"{self._schemes()} URL"


@dataclass(frozen=True)
class Choice:
    """One of ``choices``; with ``upper`` the text is matched case-insensitively."""

    choices: tuple[str, ...]
    upper: bool = False

    def parse(self, text: str) -> str:
        value = text.strip().upper() if self.upper else text.strip()
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"must be one of {'|'.join(self.choices)}")

    def describe(self) -> str:
        return "one of " + "|".join(self.choices)


Kind = Number | Text | Url | Choice
