"""docs/configuration.md, rendered from the table.

Regenerate: ``.venv/bin/python -m callmesh.settings.docs`` (writes the file); a test
fails when the committed file differs from what this renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

from callmesh.settings.model import Setting
from callmesh.settings.table import PROCESSES, SETTINGS

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = ".venv/bin/python -m callmesh.settings.docs"

_INTRO = f"""\
# Configuration

<!-- Generated from callmesh/settings/table.py by `{REGENERATE}`; do not edit. -->

Every setting of every callmesh process, with its environment variable, flag, default
and meaning. A flag overrides the environment, which overrides the default; an empty
variable counts as unset. A bad value stops the process with a one-line error naming the
variable or flag, and exit status 2. Secrets (API keys, tokens, passwords in URLs) are
masked in help, errors and logs.

`callmesh router --help`, `callmesh node --help` and `callmesh effects-worker --help` list
the same settings for one process.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(s: Setting) -> str:
    name = f"`{s.env}`" if s.env else "—"
    flag = f"`{s.flag}`" if s.flag else "—"
    default = s.shown_default()
    default = default if s.default_doc or s.default == "" else f"`{default}`"
    value = s.kind.describe() + (" (secret: masked)" if s.secret else "")
    processes = ", ".join(s.processes) if s.processes != PROCESSES else "all"
    meaning = s.meaning[:1].upper() + s.meaning[1:]
    cells = (name, flag, default, value, processes, meaning)
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def render_markdown() -> str:
    """The whole of docs/configuration.md."""
    out = [_INTRO]
    sections: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        sections.setdefault(s.section, []).append(s)
    for title, settings in sections.items():
        out += [f"## {title}", ""]
        out += ["| Variable | Flag | Default | Value | Processes | Meaning |"]
        out += ["|---|---|---|---|---|---|"]
        out += [_row(s) for s in settings]
        out.append("")
    return "\n".join(out)


def main() -> int:
    DOC_PATH.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {DOC_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
