"""Command-line flags and help generated from the table, and reading them once.

A subcommand calls :func:`add_flags`; after parsing, :func:`resolve` reads that process's
settings (flag, then environment, then default), writes each flag's final value back
into the namespace and keeps them all in ``args.settings``.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Mapping

from callmesh.settings.kinds import Url
from callmesh.settings.model import Setting, Values
from callmesh.settings.reading import load, settings_for
from callmesh.settings.table import SETTINGS

_PROCESS_DEST = "settings_process"


def dest(s: Setting) -> str:
    return s.key


def flag_help(s: Setting) -> str:
    """``meaning (env VAR; default: X)``, as ``--help`` shows it."""
    where = f"${s.env}; " if s.env else ""
    return f"{s.meaning} ({where}default: {s.shown_default()})".replace("%", "%%")


def _metavar(s: Setting) -> str:
    if isinstance(s.kind, Url):
        return "URL"
    return (s.flag or s.key).lstrip("-").upper().replace("-", "_")


def add_flags(parser: argparse.ArgumentParser, process: str) -> None:
    """Add ``process``'s flags to its subcommand's parser and list its environment-only
    settings below the options. Defaults are None: :func:`resolve` fills them in."""
    env_only: list[Setting] = []
    for s in settings_for(process):
        if s.flag and not s.top_level_flag:
            parser.add_argument(
                s.flag, dest=dest(s), default=None, metavar=_metavar(s), help=flag_help(s)
            )
        else:
            env_only.append(s)
    parser.set_defaults(**{_PROCESS_DEST: process})
    if env_only:
        parser.epilog = environment_help(env_only)
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def add_top_level_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every process reads, given before the subcommand (``callmesh --log-level``)."""
    for s in _top_level():
        if s.flag:
            parser.add_argument(
                s.flag, dest=dest(s), default=None, metavar=_metavar(s), help=flag_help(s)
            )


def _top_level() -> list[Setting]:
    return [s for s in SETTINGS if s.top_level_flag]


def environment_help(settings: list[Setting]) -> str:
    lines = ["environment (flags override it; an empty variable counts as unset):"]
    for s in settings:
        name = s.env or s.key
        also = f" (also: callmesh {s.flag} ...)" if s.flag else ""
        text = f"{s.meaning}{also}; default: {s.shown_default()}"
        lines.append(f"  {name}")
        lines += textwrap.wrap(text, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Values:
    """Read the parsed subcommand's settings once; raise ConfigError on a bad value."""
    process = getattr(args, _PROCESS_DEST, None)
    if process is None:
        raise ValueError("the subcommand's parser has no settings: call add_flags on it")
    flagged = [s for s in settings_for(process) if s.flag]
    values = load(process, env, {s.key: getattr(args, dest(s), None) for s in flagged})
    for s in flagged:
        setattr(args, dest(s), values[s.key])
    args.settings = values
    return values


def resolved(args: argparse.Namespace) -> Values:
    """``args.settings``, reading them first when the command line was parsed by a caller
    that did not (a test building one subcommand's parser)."""
    values = getattr(args, "settings", None)
    return values if isinstance(values, Values) else resolve(args)
