"""A node hears each caller with the language model of the call's own tenant: built from
that tenant's knowledge base at start-up, before any call, and rebuilt while the node runs
when the knowledge base changes. Real node, Redis and NATS; eSpeak NG speaks, Silero VAD
and pocketsphinx hear."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import pytest
from node_harness import node_call, running_node, simulated_providers

from bench.offline_speech import speak, words
from conversation_node.providers.domain_lm import DomainModel, build_domain_model
from conversation_node.providers.domain_models import DomainModels
from conversation_node.providers.espeak_tts import EspeakTTS, espeak_available
from conversation_node.providers.pocketsphinx_stt import PocketsphinxSTT, pocketsphinx_available
from conversation_node.providers.silero_vad import silero_available
from memory.tenant_kb import TenantKnowledgeBases
from state_store.client import connect
from state_store.membership import MembershipStore
from tests.cluster_helpers import eventually
from tests.tenant_kbs import DENTAL, GARAGE, SAID, SAID_NEW, add_service, write_kbs

pytestmark = [
    pytest.mark.skipif(
        not (pocketsphinx_available() and espeak_available() and silero_available()),
        reason="needs the [speech] extra: pip install -e '.[speech]'",
    ),
    pytest.mark.timeout(120),
]

_QUIET = b"\x00\x00" * 8000  # 0.5 s of 16 kHz pcm16


async def _heard(url: str, call_id: str, tenant: str, sentence: str) -> str:
    """What the node's recognizer heard of ``sentence`` said by a caller of ``tenant``."""
    async with node_call(url, call_id, via="socket") as call:
        await call.send(
            type="start", tenant=tenant, audio={"encoding": "pcm16", "sample_rate": 16000}
        )
        await call.turn(0, timeout_s=30)
        await call.echo_marks(0)
        data = _QUIET + await speak(EspeakTTS(), sentence) + _QUIET * 2
        for i in range(0, len(data), 640):  # 20 ms frames
            await call.send(type="audio", data=base64.b64encode(data[i : i + 640]).decode())
        final = await call.wait_for(
            lambda f: f["type"] == "transcript" and f["final"], timeout_s=30
        )
        return str(final["text"])


async def test_each_tenant_is_heard_with_its_own_knowledge_base(
    tmp_path: Path, redis_url: str, nats_url: str
) -> None:
    root = write_kbs(tmp_path)
    models = DomainModels(TenantKnowledgeBases(root), check_every_s=0.0)
    stt = PocketsphinxSTT(models=models, workers=1)
    providers = simulated_providers(stt=stt, tts=EspeakTTS())
    async with running_node(redis_url, nats_url, providers) as (_, url):
        for tenant in (DENTAL, GARAGE):
            heard = await _heard(url, f"call-{tenant}", tenant, SAID[tenant])
            assert words(heard) == words(SAID[tenant]), (tenant, heard)
        # The garage adds a service while the node runs. The next call of the garage
        # notices (its model is used meanwhile), and the model is rebuilt in the background.
        old = models.cached(GARAGE)
        assert old is not None and "windshield" not in old.vocabulary
        add_service(root)
        heard = await _heard(url, "call-garage-2", GARAGE, SAID[GARAGE])
        assert words(heard) == words(SAID[GARAGE]), heard
        await eventually(lambda: models.cached(GARAGE) is not old)
        new = models.cached(GARAGE)
        assert new is not None and "windshield" in new.vocabulary
        heard = await _heard(url, "call-garage-3", GARAGE, SAID_NEW)
        assert words(heard) == words(SAID_NEW), heard
        # Neither tenant's model has the other's words: said to the dental practice, the
        # garage's sentence is not heard as itself.
        heard = await _heard(url, "call-dental-2", DENTAL, SAID[GARAGE])
        assert "brake" not in words(heard), heard


class HeldBuilds:
    """Builds of ``tenant`` wait for ``release``: a slow start-up build, on demand."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.release = threading.Event()

    def __call__(self, tenant: str, kb_dir: Path | None, out_dir: Path) -> DomainModel:
        if tenant == self.tenant:
            self.release.wait(30)
        return build_domain_model(tenant, kb_dir, out_dir)


async def test_models_are_built_at_start_up_within_a_bound(
    tmp_path: Path, redis_url: str, nats_url: str
) -> None:
    root = write_kbs(tmp_path)
    (root / "slowco").mkdir()
    (root / "slowco" / "faq.md").write_text("# FAQ\n\n## Hours\nOpen on weekdays.\n")
    held = HeldBuilds("slowco")
    models = DomainModels(TenantKnowledgeBases(root), builder=held)
    stt = PocketsphinxSTT(models=models, workers=1)
    providers = simulated_providers(stt=stt)
    redis = connect(redis_url)
    try:
        async with running_node(redis_url, nats_url, providers, stt_lm_startup_s=1.0) as (
            node,
            _,
        ):
            # Before any call: the models of the tenants with a knowledge base, and the
            # demo's (every other tenant's), are built.
            for tenant in ("demo", DENTAL, GARAGE):
                model = models.cached(tenant)
                assert model is not None and model.lm_path.exists(), tenant
            assert "implant" in models.cached(DENTAL).vocabulary  # type: ignore[union-attr]
            # A build that does not finish within the bound did not hold the node back:
            # it started, announced itself, and builds the rest in the background.
            assert models.cached("slowco") is None
            assert node.node_id in await MembershipStore(redis).read_all()
            held.release.set()
            await eventually(lambda: models.cached("slowco") is not None)
    finally:
        held.release.set()
        await redis.aclose()
