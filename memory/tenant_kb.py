"""Where each tenant's knowledge base lives, and a digest of what it holds.

A node is given a directory of knowledge bases (``CALLMESH_KB_DIR``), one subdirectory per
tenant, named by the tenant id, holding that tenant's Markdown and YAML documents
(:mod:`memory.knowledge`). A tenant without one gets the shared default (the demo's); a
node given no directory serves the default to every tenant. Both the retrieval of a call
and the recognizer's language model of its tenant come from the same directory.

A knowledge base changes when its documents are edited in place: :func:`kb_digest` hashes
what the documents say (names and bytes), so a node that sees a new digest knows the
tenant's documents changed, and an edit that changes nothing (a ``touch``) is no change.

Every function here reads the disk: callers on an event loop run them in a thread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from callmesh.protocol import valid_id
from memory.errors import KnowledgeBaseError
from memory.knowledge import DEMO_KB_DIR, SUFFIXES, KnowledgeBase

__all__ = ["DEMO_TENANT", "MAX_KB_BYTES", "TenantKnowledgeBases", "kb_digest"]

# The tenant the default knowledge base is written for; a node prepares its model first.
DEMO_TENANT = "demo"
# A knowledge base larger than this is refused (it is read whole to index and to digest).
MAX_KB_BYTES = 16 << 20


def _documents(kb_dir: Path) -> list[Path]:
    """The documents of ``kb_dir``, refused over :data:`MAX_KB_BYTES`."""
    try:
        if not kb_dir.is_dir():
            raise KnowledgeBaseError(f"knowledge base directory not found: {kb_dir}")
        documents = sorted(p for p in kb_dir.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        size = sum(p.stat().st_size for p in documents)
    except OSError as exc:  # removed or unreadable while being listed
        raise KnowledgeBaseError(f"{kb_dir}: cannot read: {exc}") from exc
    if size > MAX_KB_BYTES:
        raise KnowledgeBaseError(f"{kb_dir}: {size} bytes of documents, over {MAX_KB_BYTES}")
    return documents


def kb_digest(kb_dir: Path | None) -> str:
    """A digest of the documents of ``kb_dir`` (their names and contents); ``""`` for no
    knowledge base. Raises :class:`KnowledgeBaseError` for one over :data:`MAX_KB_BYTES`
    or one that cannot be read."""
    if kb_dir is None:
        return ""
    h = hashlib.blake2b(digest_size=12)
    for path in _documents(kb_dir):
        h.update(path.relative_to(kb_dir).as_posix().encode() + b"\0")
        try:
            with path.open("rb") as f:
                h.update(hashlib.file_digest(f, "blake2b").digest())
        except OSError as exc:
            raise KnowledgeBaseError(f"{kb_dir}: cannot read: {exc}") from exc
    return h.hexdigest()


class TenantKnowledgeBases:
    """Tenant → knowledge base directory: ``root/<tenant>`` where that exists, else
    ``default``. ``dirs`` names some tenants' directories explicitly (tests, tools)."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        dirs: dict[str, Path] | None = None,
        default: Path | None = DEMO_KB_DIR,
    ) -> None:
        self.root = root
        self.default = default
        self._dirs = dict(dirs or {})

    def dir_for(self, tenant: str) -> Path | None:
        """The knowledge base of ``tenant`` (``None``: it has none, nor is there a default)."""
        if tenant in self._dirs:
            return self._dirs[tenant]
        # Only a well-formed id names a directory: never "..", a path or an empty name.
        if self.root is not None and valid_id(tenant) and (self.root / tenant).is_dir():
            return self.root / tenant
        return self.default

    def known(self, limit: int) -> list[str]:
        """Tenants with a knowledge base of their own, in name order, at most ``limit``."""
        found = set(self._dirs)
        if self.root is not None and self.root.is_dir():
            found |= {p.name for p in self.root.iterdir() if p.is_dir() and valid_id(p.name)}
        return sorted(found)[:limit]

    def index(self, limit: int) -> tuple[dict[str, KnowledgeBase], dict[str, str]]:
        """The knowledge bases of the :meth:`known` tenants, indexed for retrieval, and the
        tenants whose documents could not be read, with why: those get an empty one (no
        snippets; never the default's, which is another business's)."""
        indexed: dict[str, KnowledgeBase] = {}
        failed: dict[str, str] = {}
        for tenant in self.known(limit):
            kb_dir = self.dir_for(tenant)
            try:
                if kb_dir is None:
                    raise KnowledgeBaseError("no knowledge base")
                _documents(kb_dir)  # the size bound, before reading it whole
                indexed[tenant] = KnowledgeBase.from_directory(kb_dir)
            except KnowledgeBaseError as exc:
                indexed[tenant] = KnowledgeBase([])
                failed[tenant] = str(exc)
        return indexed, failed

    def __repr__(self) -> str:
        return f"<TenantKnowledgeBases root={self.root} default={self.default}>"
