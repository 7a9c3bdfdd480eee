"""The recognizer's language models of a node's tenants: built ahead, kept, rebuilt.

Each tenant's model is built from its own knowledge base
(:class:`~memory.tenant_kb.TenantKnowledgeBases`) and the booking conversation
(:func:`~conversation_node.providers.domain_lm.build_domain_model`). A model is keyed by
the digest of the knowledge base it was built from (:func:`~memory.tenant_kb.kb_digest`):
tenants whose documents are the same (every tenant on the shared default) share one.

* **At start-up** :meth:`DomainModels.prepare` builds the models of the tenants with a
  knowledge base of their own, and the demo tenant's, so no call waits for one.
* **When a call opens** its tenant's model is returned at once. If the tenant's
  knowledge base was last looked at ``check_every_s`` ago or more, its digest is taken
  again in the background; a changed one starts a rebuild, and calls keep the old model
  until the new one is ready. Only a tenant's very first call waits (for the digest, and
  for a build if no tenant has that knowledge base yet).
* **Bounded**: at most ``max_tenants`` tenants are kept, least recently used dropped; a
  model no kept tenant uses is dropped with its files (after the streams being opened on
  it have their decoders).
* **Never fatal**: a knowledge base that cannot be read or built keeps the tenant on the
  model it had, or, for a first build, on the booking conversation alone; it is not
  retried until its documents change again.

Builds and digests run in a worker thread, one build at a time: the event loop (the
node's calls and heartbeats) never waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from conversation_node.providers.domain_lm import DomainModel, build_domain_model
from memory.errors import KnowledgeBaseError
from memory.tenant_kb import DEMO_TENANT, TenantKnowledgeBases, kb_digest

__all__ = ["DomainModels"]

log = logging.getLogger("callmesh.node.speech")

Builder = Callable[[str, Path | None, Path], DomainModel]
_BOOKING_ONLY = ""  # the digest of no knowledge base: the booking conversation alone


@dataclasses.dataclass
class _Tenant:
    seen: str  # digest of the tenant's knowledge base when last looked at
    model: DomainModel  # built from ``seen``, or the fallback when that failed
    checked_at: float


class DomainModels:
    """Per-tenant models; see the module docstring. ``aclose`` stops every build."""

    def __init__(
        self,
        knowledge: TenantKnowledgeBases | None = None,
        *,
        max_tenants: int = 64,
        check_every_s: float = 5.0,
        builder: Builder = build_domain_model,
    ) -> None:
        if max_tenants < 1:
            raise ValueError("max_tenants must be at least 1")
        self.knowledge = knowledge or TenantKnowledgeBases()
        self.max_tenants = max_tenants
        self._check_every_s = check_every_s
        self._builder = builder
        self._dir: Path | None = None  # made on the first build
        self._tenants: OrderedDict[str, _Tenant] = OrderedDict()
        self._models: dict[str, DomainModel] = {}  # by source digest
        self._leases: Counter[str] = Counter()
        self._looking: dict[str, asyncio.Task[_Tenant]] = {}  # by tenant
        self._building: dict[str, asyncio.Task[DomainModel]] = {}  # by source digest
        self._chores: set[asyncio.Task[Any]] = set()  # file removals, the start-up builds
        self._build_slot = asyncio.Semaphore(1)
        self._closed = False

    # ------------------------------------------------------------------ the calls' side

    async def get(self, tenant: str) -> DomainModel:
        """``tenant``'s current model (waits only for a tenant never seen before)."""
        entry = self._tenants.get(tenant)
        if entry is None:
            return (await asyncio.shield(self._look(tenant))).model
        self._tenants.move_to_end(tenant)
        now = time.monotonic()
        if now - entry.checked_at >= self._check_every_s and tenant not in self._looking:
            entry.checked_at = now
            self._look(tenant)  # in the background: this call keeps the model it has
        return entry.model

    @contextlib.asynccontextmanager
    async def use(self, tenant: str) -> AsyncIterator[DomainModel]:
        """:meth:`get`, and the model's files kept until the block ends (a decoder is
        being made from them), even if the tenant is dropped meanwhile."""
        model = await self.get(tenant)
        self._leases[model.source] += 1
        try:
            yield model
        finally:
            self._leases[model.source] -= 1
            if not self._leases[model.source]:
                del self._leases[model.source]
                self._drop_if_unused(model.source)

    async def refresh(self, tenant: str) -> DomainModel:
        """Look at ``tenant``'s knowledge base now; the model in use once any rebuild it
        needed is done."""
        if tenant in self._looking:
            await asyncio.shield(self._looking[tenant])
        return (await asyncio.shield(self._look(tenant))).model

    def cached(self, tenant: str) -> DomainModel | None:
        """``tenant``'s model if one is ready (no build, no check)."""
        entry = self._tenants.get(tenant)
        return entry.model if entry is not None else None

    # ------------------------------------------------------------------ start-up

    def start_prepare(self) -> asyncio.Task[list[str]]:
        """Start building the models of the demo tenant and of the tenants with a
        knowledge base of their own (up to ``max_tenants``); owned here."""
        task = asyncio.create_task(self._prepare(), name="domain-lm:prepare")
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)
        return task

    async def _prepare(self) -> list[str]:
        known = await asyncio.to_thread(self.knowledge.known, self.max_tenants)
        tenants = [DEMO_TENANT, *(t for t in known if t != DEMO_TENANT)][: self.max_tenants]
        for tenant in tenants:
            await self.get(tenant)
        return tenants

    # ------------------------------------------------------------------ looking, building

    def _look(self, tenant: str) -> asyncio.Task[_Tenant]:
        task = self._looking.get(tenant)
        if task is None:
            task = asyncio.create_task(self._looked(tenant), name=f"domain-lm:{tenant}")
            self._looking[tenant] = task
            task.add_done_callback(lambda t: self._looked_done(tenant, t))
        return task

    def _looked_done(self, tenant: str, task: asyncio.Task[_Tenant]) -> None:
        self._looking.pop(tenant, None)
        # A look in the background has nobody awaiting it: its failure is reported here.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("domain language model failed: %s", exc, extra={"fields": {"tenant": tenant}})

    async def _looked(self, tenant: str) -> _Tenant:
        old = self._tenants.get(tenant)
        unreadable: KnowledgeBaseError | None = None
        try:
            kb_dir, seen = await asyncio.to_thread(self._locate, tenant)
        except KnowledgeBaseError as exc:
            # Removed, unreadable, too large: what it says cannot be known; the same error
            # next time is no change (not retried, not logged again).
            kb_dir, seen, unreadable = None, f"unreadable: {exc}", exc
        if old is not None and old.seen == seen:
            old.checked_at = time.monotonic()
            return old
        try:
            if unreadable is not None:
                raise unreadable
            model = self._models.get(seen) or await self._build(seen, tenant, kb_dir)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad document: the tenant keeps talking, on less
            model = old.model if old is not None else await self._fallback(tenant)
            log.warning(
                "knowledge base not usable for speech recognition: %s",
                exc,
                extra={"fields": {"tenant": tenant, "kept": model.source or "booking only"}},
            )
        return self._keep(tenant, _Tenant(seen, model, time.monotonic()))

    def _locate(self, tenant: str) -> tuple[Path | None, str]:
        kb_dir = self.knowledge.dir_for(tenant)
        return kb_dir, kb_digest(kb_dir)

    async def _fallback(self, tenant: str) -> DomainModel:
        return self._models.get(_BOOKING_ONLY) or await self._build(_BOOKING_ONLY, tenant, None)

    def _build(self, source: str, tenant: str, kb_dir: Path | None) -> asyncio.Task[DomainModel]:
        task = self._building.get(source)
        if task is None:
            task = asyncio.create_task(self._built(source, tenant, kb_dir), name="domain-lm:build")
            self._building[source] = task
            task.add_done_callback(lambda _t: self._building.pop(source, None))
        return task

    async def _built(self, source: str, tenant: str, kb_dir: Path | None) -> DomainModel:
        async with self._build_slot:  # one at a time: a build is all CPU
            if self._dir is None:
                self._dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="callmesh-lm-"))
            built = await asyncio.to_thread(
                self._builder, tenant, kb_dir, self._dir / (source or "booking")
            )
        model = dataclasses.replace(built, source=source)
        self._models[source] = model
        log.info(
            "domain language model built",
            extra={
                "fields": {
                    "tenant": tenant,
                    "digest": model.digest,
                    "words": len(model.vocabulary),
                    "sentences": model.sentences,
                    "dropped_words": len(model.dropped_words),
                    "build_s": round(model.built_in_s, 3),
                }
            },
        )
        return model

    def _keep(self, tenant: str, entry: _Tenant) -> _Tenant:
        old = self._tenants.get(tenant)
        self._tenants[tenant] = entry
        self._tenants.move_to_end(tenant)
        dropped = [old.model.source] if old is not None else []
        while len(self._tenants) > self.max_tenants:
            _, gone = self._tenants.popitem(last=False)
            dropped.append(gone.model.source)
        for source in dropped:
            self._drop_if_unused(source)
        return entry

    def _drop_if_unused(self, source: str) -> None:
        if (
            source not in self._models
            or self._leases[source]
            or any(t.model.source == source for t in self._tenants.values())
        ):
            return
        model = self._models.pop(source)
        removal = asyncio.create_task(
            asyncio.to_thread(shutil.rmtree, model.lm_path.parent, True), name="domain-lm:rm"
        )
        self._chores.add(removal)
        removal.add_done_callback(self._chores.discard)

    # ------------------------------------------------------------------ lifecycle

    async def aclose(self) -> None:
        """Stop the builds and remove every model's files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._looking.values(), *self._building.values(), *self._chores]
        for task in tasks:
            task.cancel()
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        if self._dir is not None:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, self._dir, True))

    def __len__(self) -> int:
        return len(self._tenants)

    def __repr__(self) -> str:
        building = f", {len(self._building)} building" if self._building else ""
        return (
            f"<DomainModels [{len(self._tenants)}/{self.max_tenants} tenants, "
            f"{len(self._models)} models{building}]>"
        )
