"""Reading a process's settings from the table: flag, then environment, then default."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any

from callmesh.settings.model import Setting, Source, Values
from callmesh.settings.table import CHECKS, SETTINGS


def settings_for(process: str) -> list[Setting]:
    """The settings ``process`` reads, in the table's order."""
    return [s for s in SETTINGS if process in s.processes]


def setting(process: str, key: str) -> Setting:
    for s in settings_for(process):
        if s.key == key:
            return s
    raise KeyError(f"no setting {key!r} for {process}")


def default(process: str, key: str) -> Any:
    """The declared default of one setting (for the dataclasses' field defaults)."""
    return setting(process, key).default


def load(
    process: str,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    only: Collection[str] | None = None,
) -> Values:
    """Read ``process``'s settings: ``flags`` (by key; None = not given), then ``env``
    (``os.environ`` when None; an empty variable counts as unset), then the default."""
    env = os.environ if env is None else env
    flags = flags or {}
    items: dict[str, tuple[Setting, Any, Source]] = {}
    for s in settings_for(process):
        if only is not None and s.key not in only:
            continue
        raw = flags.get(s.key)
        if raw is not None:
            label = s.flag or s.key
            if isinstance(raw, str):
                items[s.key] = (s, s.parse(raw, label), "flag")
            else:
                s.check(raw, label)
                items[s.key] = (s, raw, "flag")
        elif s.env and env.get(s.env):
            items[s.key] = (s, s.parse(env[s.env], s.env), "env")
        else:
            items[s.key] = (s, s.default, "default")
    values = Values(process, items)
    for check_process, keys, check in CHECKS:
        if check_process == process and all(k in values for k in keys):
            check(values)
    return values


def check_fields(obj: Any, process: str) -> None:
    """Check every field of a config dataclass that is a setting of ``process`` against the
    setting's kind, so a config built in code meets the same bounds as one read from env."""
    declared = {s.key: s for s in settings_for(process)}
    for f in dataclasses.fields(obj):
        s = declared.get(f.name)
        value = getattr(obj, f.name)
        if s is not None and value is not None:
            s.check(value, s.label)
