"""The chaos controls a local cluster gives ``loadtest chaos``: the simulated model's
slow-down file (refused with any other model) and the delaying link proxy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from callmesh.config import ConfigError
from conversation_node.providers.base import LLMRequest
from conversation_node.providers.registry import ProviderSettings, build_providers
from conversation_node.providers.simulated import SimulatedLLM, SlowdownFile
from localcluster.link_proxy import Delays, ProxyServer


def test_the_slowdown_file_is_refused_with_a_real_model(tmp_path: Path) -> None:
    control = str(tmp_path / "slow")
    for env in (
        {"CALLMESH_SIM_LLM_CONTROL_FILE": control, "OPENAI_API_KEY": "sk-test"},
        {
            "CALLMESH_SIM_LLM_CONTROL_FILE": control,
            "CALLMESH_LLM": "openai",
            "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
        },
    ):
        with pytest.raises(ConfigError, match="simulated model only"):
            ProviderSettings.from_env(env)
    with pytest.raises(ConfigError):  # a relative path is not taken either
        ProviderSettings.from_env({"CALLMESH_SIM_LLM_CONTROL_FILE": "slow"})


def test_without_the_setting_the_simulated_model_has_no_slowdown() -> None:
    providers = build_providers(ProviderSettings.from_env({}))
    assert isinstance(providers.llm, SimulatedLLM) and providers.llm._slowdown is None


def test_the_slowdown_file_is_read_as_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "slow"
    slow = SlowdownFile(str(path))
    assert slow.extra_s() == 0.0  # no file: as configured
    path.write_text("1500\n")
    assert slow.extra_s() == 1.5
    for bad in ("lots", "-5", "999999999"):
        path.write_text(bad)
        time.sleep(0.01)  # a new modification time
        assert slow.extra_s() == 0.0, bad
    path.unlink()
    assert slow.extra_s() == 0.0


async def test_a_slowed_simulated_model_answers_later(tmp_path: Path) -> None:
    path = tmp_path / "slow"
    settings = ProviderSettings.from_env(
        {"CALLMESH_SIM_LATENCY_SCALE": "0", "CALLMESH_SIM_LLM_CONTROL_FILE": str(path)}
    )
    llm = build_providers(settings).llm
    request = LLMRequest(messages=[], user_text="hello", facts={}, snippets=[], seed="s")

    async def first_token_s() -> float:
        t0 = time.monotonic()
        async for _ in llm.stream(request):
            return time.monotonic() - t0
        raise AssertionError("no token")

    assert await first_token_s() < 0.1
    path.write_text("300")
    assert await first_token_s() >= 0.3
    path.write_text("0")
    assert await first_token_s() < 0.1


async def test_the_link_proxy_delays_and_keeps_byte_order() -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(1024):
                w.write(data)
                await w.drain()
        finally:
            w.close()
            await w.wait_closed()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = ProxyServer()
    port = await proxy.add(target.sockets[0].getsockname()[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
        proxy.delays.set(100, 80)
        t0 = time.monotonic()
        sent = b"".join(b"%05d" % i for i in range(200))
        for i in range(0, len(sent), 50):
            writer.write(sent[i : i + 50])
            await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(sent)), 5)
        assert got == sent  # jitter never reorders
        assert time.monotonic() - t0 >= 0.04  # at least delay - jitter, each way
    finally:
        writer.close()
        await writer.wait_closed()
        await proxy.aclose()
        target.close()
        await target.wait_closed()


def test_delays_are_bounded() -> None:
    d = Delays()
    with pytest.raises(ValueError, match=r"0\.\.5000 ms"):
        d.set(6000, 0)
    d.set(50, 100)
    assert all(d.sample() >= 0 for _ in range(100))  # jitter never goes below zero
