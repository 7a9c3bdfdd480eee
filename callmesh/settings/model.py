"""A setting's declaration, and the values of one process's settings once read.

A value is parsed and checked here, and a bad one is a :class:`ConfigError` naming the
variable or flag (its value masked when the setting is secret).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from callmesh.secret_masking import SECRET_MASK as MASK
from callmesh.secret_masking import mask_url
from callmesh.settings.kinds import ConfigError, Kind, Url

Source = Literal["flag", "env", "default"]


@dataclass(frozen=True)
class Setting:
    """One setting of one or more processes.

    ``key`` names it in code (a config field, an argparse dest); two settings may share a
    key only when no process reads both (``port`` is one setting per process). ``default``
    None means computed at run time, which ``default_doc`` then describes.
    """

    key: str
    kind: Kind
    default: Any
    meaning: str
    processes: tuple[str, ...]
    section: str
    env: str | None = None
    flag: str | None = None
    secret: bool = False
    default_doc: str = ""
    # The flag belongs to the top-level ``callmesh`` parser (``callmesh --log-level ...``).
    top_level_flag: bool = False

    @property
    def label(self) -> str:
        """How an error names it: the environment variable, else the flag."""
        return self.env or self.flag or self.key

    def shown(self, value: Any) -> str:
        """``value`` as help, docs and errors may show it."""
        if value is None:
            return self.default_doc
        if self.secret and value and not isinstance(self.kind, Url):
            return MASK
        if self.secret and isinstance(value, str):
            return mask_url(value)
        return str(value)

    def shown_default(self) -> str:
        return self.default_doc or (self.shown(self.default) if self.default != "" else "unset")

    def parse(self, text: str, label: str) -> Any:
        try:
            return self.kind.parse(text)
        except ValueError as exc:
            raise ConfigError(f"{label}={self.shown(text)!r}: {exc}") from None

    def check(self, value: Any, label: str) -> None:
        try:
            self.kind.check(value)
        except ValueError as exc:
            raise ConfigError(f"{label}={self.shown(value)!r}: {exc}") from None


class Values(Mapping[str, Any]):
    """A process's settings, read once: value and source (flag, env or default) per key."""

    def __init__(self, process: str, items: Mapping[str, tuple[Setting, Any, Source]]) -> None:
        self.process = process
        self._items = dict(items)

    def __getitem__(self, key: str) -> Any:
        return self._items[key][1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def source(self, key: str) -> Source:
        return self._items[key][2]

    def given(self, key: str) -> bool:
        """True when a flag or the environment set it (not left to its default)."""
        return key in self._items and self._items[key][2] != "default"

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={s.shown(v)!r}" for k, (s, v, _) in self._items.items())
        return f"<Values {self.process}: {shown}>"
