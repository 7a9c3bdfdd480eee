"""The offline recognizer's per-tenant language models (conversation_node.providers.
domain_models): each tenant's own, keyed by what its knowledge base says, rebuilt in the
background when that changes, bounded, and never fatal. Real builds (tens of ms each)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from pathlib import Path

import pytest

from bench.offline_speech import words
from conversation_node.providers.domain_lm import DomainModel, build_domain_model
from conversation_node.providers.domain_models import DomainModels
from conversation_node.providers.pocketsphinx_stt import pocketsphinx_available
from memory.tenant_kb import MAX_KB_BYTES, TenantKnowledgeBases, kb_digest
from tests.cluster_helpers import eventually
from tests.tenant_kbs import DENTAL, GARAGE, add_service, write_kbs

pytestmark = pytest.mark.skipif(
    not pocketsphinx_available(), reason="needs the [speech] extra (the CMU dictionary)"
)


class Builds:
    """build_domain_model, counting builds per tenant; a tenant's builds can be held."""

    def __init__(self) -> None:
        self.count: Counter[str] = Counter()
        self.hold: dict[str, threading.Event] = {}

    def __call__(self, tenant: str, kb_dir: Path | None, out_dir: Path) -> DomainModel:
        self.count[tenant] += 1
        if tenant in self.hold:
            self.hold[tenant].wait(10)
        return build_domain_model(tenant, kb_dir, out_dir)


async def eventually_built(models: DomainModels, tenant: str, word: str) -> DomainModel:
    await eventually(lambda: word in getattr(models.cached(tenant), "vocabulary", ()))
    model = models.cached(tenant)
    assert model is not None
    return model


async def test_each_tenant_gets_the_model_of_its_own_knowledge_base(tmp_path: Path) -> None:
    models = DomainModels(TenantKnowledgeBases(write_kbs(tmp_path)))
    try:
        dental, garage = await models.get(DENTAL), await models.get(GARAGE)
        assert {"implant", "veneers"} <= dental.vocabulary and "brake" not in dental.vocabulary
        assert {"brake", "alignment"} <= garage.vocabulary and "veneers" not in garage.vocabulary
        # The booking conversation is everyone's; the services in it are the tenant's.
        assert dental.context_share(words("I'd like to book an implant consultation")) == 1.0
        assert garage.context_share(words("How much is a wheel alignment")) == 1.0
        # Tenants without a knowledge base of their own share the default (the demo's).
        demo, other = await models.get("demo"), await models.get("someone-else")
        assert other is demo and "riverside" in demo.vocabulary
        assert len({dental.lm_path, garage.lm_path, demo.lm_path}) == 3
    finally:
        await models.aclose()


async def test_a_changed_knowledge_base_is_rebuilt_while_calls_keep_the_old_model(
    tmp_path: Path,
) -> None:
    root = write_kbs(tmp_path)
    builds = Builds()
    models = DomainModels(TenantKnowledgeBases(root), check_every_s=0.0, builder=builds)
    try:
        old = await models.get(GARAGE)
        assert "windshield" not in old.vocabulary
        (root / GARAGE / "services.md").touch()  # the same words: no rebuild
        await models.refresh(GARAGE)
        assert builds.count[GARAGE] == 1
        builds.hold[GARAGE] = threading.Event()
        add_service(root)
        assert await models.get(GARAGE) is old, "a call opening now does not wait"
        await asyncio.sleep(0.05)  # the rebuild has started, and is held
        assert await models.get(GARAGE) is old, "nor does one opening during the rebuild"
        builds.hold[GARAGE].set()
        new = await eventually_built(models, GARAGE, "windshield")
        assert builds.count[GARAGE] == 2 and new.source == kb_digest(root / GARAGE)
        assert await models.get(GARAGE) is new
        assert not old.lm_path.exists(), "the old model's files are removed"
    finally:
        await models.aclose()


async def test_kept_tenants_are_bounded_least_recently_used_dropped(tmp_path: Path) -> None:
    root = write_kbs(tmp_path)
    for name in ("third", "fourth"):
        (root / name).mkdir()
        (root / name / "faq.md").write_text(f"# FAQ\n\n## Who\nThe {name} shop.\n")
    models = DomainModels(TenantKnowledgeBases(root), max_tenants=2)
    try:
        dental = await models.get(DENTAL)
        await models.get(GARAGE)
        async with models.use("third") as third:
            await models.get("fourth")  # the dental practice and the garage are dropped
            assert models.cached(DENTAL) is None and models.cached(GARAGE) is None
            assert len(models) == 2
            await models.get(DENTAL)  # built again; the least recently used, "third", goes
            assert models.cached("third") is None
            assert third.lm_path.exists(), "kept while a stream is being opened on it"
        await eventually(lambda: not third.lm_path.exists())  # removed in a thread
        assert dental.lm_path.parent == (await models.get(DENTAL)).lm_path.parent
        assert len(list(dental.lm_path.parent.parent.iterdir())) == 2, "one per kept tenant"
    finally:
        await models.aclose()
    assert not dental.lm_path.parent.parent.exists(), "aclose removes every file"


async def test_a_broken_knowledge_base_never_stops_recognition(tmp_path: Path) -> None:
    root = write_kbs(tmp_path)
    (root / "broken").mkdir()
    (root / "broken" / "prices.yaml").write_text("title: [unclosed\n")
    builds = Builds()
    models = DomainModels(TenantKnowledgeBases(root), check_every_s=0.0, builder=builds)
    try:
        booking_only = await models.get("broken")  # the booking conversation alone
        assert "tuesday" in booking_only.vocabulary and booking_only.source == ""
        tried = builds.count["broken"]  # its own (failed), then the booking conversation
        assert await models.refresh("broken") is booking_only
        assert builds.count["broken"] == tried, "not retried until its documents change"
        garage = await models.get(GARAGE)
        (root / GARAGE / "bad.yaml").write_text("entries: 3\n")  # now broken too
        assert await models.refresh(GARAGE) is garage, "keeps the model it had"
        (root / GARAGE / "huge.md").write_bytes(b"#" * (MAX_KB_BYTES + 1))
        assert await models.refresh(GARAGE) is garage, "over the size bound: kept too"
    finally:
        await models.aclose()


async def test_start_up_builds_the_known_tenants_and_the_demo(tmp_path: Path) -> None:
    models = DomainModels(TenantKnowledgeBases(write_kbs(tmp_path)))
    try:
        assert await models.start_prepare() == ["demo", GARAGE, DENTAL]
        assert all(models.cached(t) is not None for t in ("demo", GARAGE, DENTAL))
    finally:
        await models.aclose()


def test_a_tenant_id_never_reaches_outside_the_knowledge_base_directory(tmp_path: Path) -> None:
    root = write_kbs(tmp_path / "kbs")
    (tmp_path / "secret").mkdir()
    kbs = TenantKnowledgeBases(root, default=None)
    assert kbs.dir_for(GARAGE) == root / GARAGE
    for tenant in ("../secret", "..", ".", "", "a/b", GARAGE + "/.."):
        assert kbs.dir_for(tenant) is None, tenant
    (root / "bad name").mkdir()
    assert kbs.known(10) == [GARAGE, DENTAL]
    assert kbs.known(1) == [GARAGE]


def test_idle_decoders_are_bounded_over_all_models() -> None:
    from conversation_node.providers import sphinx_worker

    host = sphinx_worker._Host()
    stream = 0
    for model in range(6):  # six tenants' models, ten streams each, all closed
        for _ in range(10):
            stream += 1
            host.decoders[stream] = ((f"lm{model}", "dict"), object())
            host.handle("close", stream, None)
    assert sum(len(idle) for idle in host.idle.values()) == sphinx_worker._IDLE_MAX
    assert ("lm0", "dict") not in host.idle, "the least recently used model's went first"
    assert len(host.idle[("lm5", "dict")]) == 10


async def test_retrieval_reads_the_same_knowledge_bases(tmp_path: Path) -> None:
    from conversation_node.node_services import MemoryServices
    from memory.history import InMemoryHistoryStore
    from memory.sources import Query

    root = write_kbs(tmp_path)
    (root / "broken").mkdir()
    (root / "broken" / "prices.yaml").write_text("title: [unclosed\n")
    memory = MemoryServices.build(
        InMemoryHistoryStore(), working_turns=4, tenants=TenantKnowledgeBases(root)
    )
    try:

        async def found(tenant: str, text: str) -> str:
            result = await memory.retrieval.retrieve(Query(text, tenant, "caller"))
            return " ".join(s.text for s in result.snippets if s.source == "knowledge_base")

        assert "brake" in await found(GARAGE, "brake inspection")
        assert await found(DENTAL, "brake inspection") == ""
        assert "veneers" in await found(DENTAL, "porcelain veneers")
        assert "Riverside" in await found("someone-else", "riverside office address")
        # Unreadable documents: no snippets, never the demo practice's.
        assert await found("broken", "riverside office address") == ""
    finally:
        await memory.aclose()
