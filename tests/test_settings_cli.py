"""``callmesh router|node`` as real processes: help generated from the table, and a bad
setting stopped with one line naming it and exit status 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from callmesh import settings
from callmesh.settings.table import NODE, ROUTER
from localcluster.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    # Backends on closed ports: should a bad value get through, the process fails to
    # connect instead of reaching the machine's own Redis or NATS.
    closed = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLMESH_", "TWILIO_"))}
    for key in ("DEEPGRAM_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "TIKTOKEN_CACHE_DIR"):
        env.pop(key, None)
    return {
        **env,
        "REDIS_URL": f"redis://127.0.0.1:{closed}/0",
        "NATS_URL": f"nats://127.0.0.1:{closed}",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callmesh", *argv],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("process", [ROUTER, NODE])
def test_help_shows_every_setting_with_its_variable_and_default(process: str) -> None:
    secret = "tw-s3cret-value"
    done = _run([process, "--help"], _env(TWILIO_AUTH_TOKEN=secret, DEEPGRAM_API_KEY=secret))
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    for s in settings.settings_for(process):
        assert (s.env or s.flag or "") in text, s.key
        assert " ".join(s.shown_default().split()) in text, s.key
    assert secret not in done.stdout


@pytest.mark.parametrize(
    ("argv", "extra", "named"),
    [
        (["router"], {"CALLMESH_HEARTBEAT_MS": "fast"}, "CALLMESH_HEARTBEAT_MS='fast'"),
        (["router"], {"CALLMESH_MAX_UNACKED_AUDIO_MS": "-5"}, "CALLMESH_MAX_UNACKED_AUDIO_MS"),
        (["router"], {"REDIS_URL": "http://user:pw-s3cret@db"}, "REDIS_URL"),
        (["router", "--port", "70000"], {}, "--port='70000': must be <= 65535"),
        (["router"], {"CALLMESH_LOG_LEVEL": "loud"}, "CALLMESH_LOG_LEVEL"),
        (["node"], {"CALLMESH_STT": "whisper"}, "CALLMESH_STT='whisper'"),
        (["node"], {"CALLMESH_LLM": "openai"}, "needs OPENAI_API_KEY"),
        (["node"], {"CALLMESH_TURN_BUDGET_MS": "soon"}, "CALLMESH_TURN_BUDGET_MS"),
        (["node", "--advertise-url", "node-1:8090"], {}, "--advertise-url"),
        (["up", "--speech", "loud"], {}, "--speech='loud'"),
        (["node"], {"CALLMESH_SPEECH": "tones"}, "CALLMESH_SPEECH='tones'"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_status_2(
    argv: list[str], extra: dict[str, str], named: str
) -> None:
    done = _run(argv, _env(**extra))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("callmesh: configuration error: ") and named in lines[0]
    assert "Traceback" not in done.stderr and "s3cret" not in done.stderr


def test_up_without_the_speech_extra_says_so_before_starting_anything(tmp_path: Path) -> None:
    # The eSpeak wheel hidden: an import of it fails as if it were not installed.
    hidden = tmp_path / "espeakng_loader"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = _env(PYTHONPATH=str(tmp_path), CALLMESH_PORT=str(free_port()))
    done = _run(["up"], env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "[speech] extra (missing: espeakng-loader)" in lines[0]
    assert "--speech simulated" in lines[0] and "CALLMESH_SPEECH=simulated" in lines[0]
    assert "starting" not in done.stdout  # no server was started
