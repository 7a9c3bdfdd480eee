"""A tenant's recognizer language model: a trigram ARPA model and its pronunciations.

pocketsphinx with its generic English model mis-hears most of a receptionist call (word
error rate 0.87 measured); the same acoustic model constrained to what callers of this
tenant say does far better. :func:`build_domain_model` turns the tenant's corpus
(:mod:`~conversation_node.providers.domain_corpus`) into:

* an ARPA trigram model with interpolated Witten-Bell smoothing (forgiving: any word
  sequence of the vocabulary keeps a small probability, unlike a grammar);
* a pronunciation dictionary of just those words, from the CMU dictionary shipped with
  pocketsphinx (a small dictionary is what makes a decoder cheap to create).

:class:`DomainModels` keeps one model per tenant, built from its knowledge base
directory, and rebuilds it when a document there changes (checked at most every
``check_every_s``, by file sizes and modification times).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from conversation_node.providers.domain_corpus import booking_sentences, kb_sentences
from memory.knowledge import DEMO_KB_DIR, SUFFIXES, load_passages

__all__ = ["DomainModel", "DomainModels", "arpa_trigram", "build_domain_model"]

log = logging.getLogger("callmesh.node.speech")

BOS, EOS = "<s>", "</s>"
_UNIGRAM_FLOOR = 0.5  # pseudo-count of every vocabulary word in the unigram distribution


def count_ngrams(sentences: Iterable[list[str]]) -> list[Counter[tuple[str, ...]]]:
    """Unigram, bigram and trigram counts of ``sentences`` (padded with <s> and </s>)."""
    counts: list[Counter[tuple[str, ...]]] = [Counter(), Counter(), Counter()]
    for words in sentences:
        padded = [BOS, *words, EOS]
        for n in (1, 2, 3):
            for i in range(len(padded) - n + 1):
                counts[n - 1][tuple(padded[i : i + n])] += 1
    return counts


def arpa_trigram(counts: list[Counter[tuple[str, ...]]]) -> str:
    """An ARPA trigram model from :func:`count_ngrams` with interpolated Witten-Bell
    smoothing. Seen n-grams carry the interpolated probability; a history's backoff weight
    gives unseen continuations the remaining mass in proportion to the lower order.
    """
    # Per history: total count and number of distinct followers (Witten-Bell's T).
    totals: list[Counter[tuple[str, ...]]] = [Counter(), Counter()]
    kinds: list[Counter[tuple[str, ...]]] = [Counter(), Counter()]
    for n in (2, 3):
        for gram, c in counts[n - 1].items():
            totals[n - 2][gram[:-1]] += c
            kinds[n - 2][gram[:-1]] += 1

    vocab = sorted(w for (w,) in counts[0] if w != BOS)
    uni_total = sum(c for (w,), c in counts[0].items() if w != BOS)
    denominator = uni_total + _UNIGRAM_FLOOR * len(vocab)
    prob: dict[tuple[str, ...], float] = {
        (w,): (counts[0][(w,)] + _UNIGRAM_FLOOR) / denominator for w in vocab
    }

    def lower(gram: tuple[str, ...]) -> float:
        # A seen n-gram's suffix was seen too (in the same sentence), so it has its prob.
        return prob[gram[1:]]

    for n in (2, 3):
        for gram, c in counts[n - 1].items():
            h = gram[:-1]
            total, distinct = totals[n - 2][h], kinds[n - 2][h]
            lam = total / (total + distinct)
            prob[gram] = lam * c / total + (1 - lam) * lower(gram)
    backoff: dict[tuple[str, ...], float] = {}
    for n in (2, 3):
        seen: dict[tuple[str, ...], tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        for gram in counts[n - 1]:
            p, q = seen[gram[:-1]]
            seen[gram[:-1]] = (p + prob[gram], q + lower(gram))
        for h, (p, q) in seen.items():
            backoff[h] = max(1e-12, 1 - p) / max(1e-12, 1 - q)

    def lg(x: float) -> str:
        return f"{math.log10(x):.5f}"

    grams = [sorted(prob_n) for prob_n in _by_order(prob)]
    lines = ["\\data\\", f"ngram 1={len(grams[0]) + 1}"]
    lines += [f"ngram {n}={len(grams[n - 1])}" for n in (2, 3)]
    # <s> is only ever a history: log-probability -99 by convention, with its backoff.
    lines += ["", "\\1-grams:", f"-99.00000\t{BOS}\t{lg(backoff.get((BOS,), 1.0))}"]
    for order in (1, 2, 3):
        if order > 1:
            lines += ["", f"\\{order}-grams:"]
        for gram in grams[order - 1]:
            weight = f"\t{lg(backoff.get(gram, 1.0))}" if order < 3 else ""
            lines.append(f"{lg(prob[gram])}\t{' '.join(gram)}{weight}")
    lines += ["", "\\end\\", ""]
    return "\n".join(lines)


def _by_order(prob: Mapping[tuple[str, ...], float]) -> list[list[tuple[str, ...]]]:
    out: list[list[tuple[str, ...]]] = [[], [], []]
    for gram in prob:
        out[len(gram) - 1].append(gram)
    return out


# ---------------------------------------------------------------- pronunciations


def _cmudict_path() -> Path:
    from pocketsphinx import get_model_path

    return Path(get_model_path("en-us/cmudict-en-us.dict"))


_CMUDICT: dict[str, list[str]] | None = None


def _cmudict() -> dict[str, list[str]]:
    """word → its pronunciation lines (``word(2)`` alternates included), read once."""
    global _CMUDICT
    if _CMUDICT is None:
        table: dict[str, list[str]] = defaultdict(list)
        with _cmudict_path().open(encoding="utf-8") as f:
            for line in f:
                head, _, _ = line.partition(" ")
                table[head.split("(", 1)[0]].append(line.rstrip("\n"))
        _CMUDICT = dict(table)
    return _CMUDICT


_VOICELESS = frozenset(["P", "T", "K", "F", "TH"])


def pronounce(word: str, lexicon: Mapping[str, list[str]]) -> list[str]:
    """Phone strings of ``word``: the dictionary's, else composed from it: a plural of a
    known word, two known words run together ("toothache", "brightsmile"), or a short
    acronym spelled out ("ppo"). Empty when none applies."""

    def phones(w: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in lexicon.get(w, ())]

    if word in lexicon:
        return phones(word)
    if word.endswith("s") and (base := phones(word[:-1])):
        return [f"{p} {'S' if p.rsplit(' ', 1)[-1] in _VOICELESS else 'Z'}" for p in base]
    for cut in range(2, len(word) - 1):
        left, right = phones(word[:cut]), phones(word[cut:])
        if left and right:
            return [f"{left[0]} {right[0]}"]
    if len(word) <= 4 and all(phones(c) for c in word):
        return [" ".join(phones(c)[0] for c in word)]
    return []


@dataclass(frozen=True)
class DomainModel:
    """One built model: files on disk (what pocketsphinx loads) and what went into them."""

    tenant: str
    digest: str  # of the corpus: equal digests, equal models
    lm_path: Path
    dict_path: Path
    vocabulary: frozenset[str]
    sentences: int
    dropped_words: frozenset[str]  # corpus words without a pronunciation (left out)
    built_in_s: float
    trigrams: frozenset[tuple[str, ...]] = frozenset()  # seen in the corpus, <s>-padded

    def context_share(self, words: list[str]) -> float:
        """Share of ``words`` after the first whose trigram (with the two words before,
        <s>-padded) the corpus has: how much of an utterance is something callers say.
        A one-word utterance counts if callers start with it ("yes", "Tuesday")."""
        padded = [BOS, BOS, *words]
        if len(words) == 1:
            return 1.0 if (BOS, words[0]) in self.trigrams else 0.0
        hits = [tuple(padded[i : i + 3]) in self.trigrams for i in range(1, len(words))]
        return round(sum(hits) / len(hits), 3) if hits else 0.0


def _pronounceable(
    sentences: Iterable[list[str]],
    lexicon: Mapping[str, list[str]],
    known: dict[str, list[str]],
    dropped: set[str],
) -> Iterable[list[str]]:
    """Sentences cut at words that cannot be pronounced (the pieces either side are still
    good text; joining them would invent a bigram nobody says). ``known`` collects the
    pronunciations of the words kept."""
    for words in sentences:
        piece: list[str] = []
        for word in words:
            if word not in known and word not in dropped:
                if found := pronounce(word, lexicon):
                    known[word] = found
                else:
                    dropped.add(word)
            if word in known:
                piece.append(word)
                continue
            if piece:
                yield piece
            piece = []
        if piece:
            yield piece


def build_domain_model(tenant: str, kb_dir: Path | None, out_dir: Path) -> DomainModel:
    """Build ``tenant``'s model from its knowledge base (``None``: booking talk only)."""
    started = time.perf_counter()
    lexicon = _cmudict()
    corpus: list[list[str]] = list(booking_sentences())
    if kb_dir is not None:
        corpus += list(kb_sentences(load_passages(kb_dir)))
    dropped: set[str] = set()
    known: dict[str, list[str]] = {}
    sentences = list(_pronounceable(corpus, lexicon, known, dropped))
    counts = count_ngrams(sentences)
    arpa = arpa_trigram(counts)
    # Trigrams, plus sentence-initial bigrams under the key (<s>, w) for one-word answers.
    seen = frozenset(counts[2]) | frozenset(g for g in counts[1] if g[0] == BOS)
    vocabulary = frozenset(w for s in sentences for w in s)
    digest = hashlib.blake2b(arpa.encode(), digest_size=8).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    lm_path, dict_path = out_dir / f"{digest}.arpa", out_dir / f"{digest}.dict"
    lm_path.write_text(arpa, encoding="utf-8")
    dict_lines = [
        f"{w if i == 1 else f'{w}({i})'} {phones}"
        for w in sorted(vocabulary)
        for i, phones in enumerate(known[w], start=1)
    ]
    dict_path.write_text("\n".join(dict_lines) + "\n", encoding="utf-8")
    return DomainModel(
        tenant=tenant,
        digest=digest,
        lm_path=lm_path,
        dict_path=dict_path,
        vocabulary=vocabulary,
        sentences=len(sentences),
        dropped_words=frozenset(dropped),
        trigrams=seen,
        built_in_s=time.perf_counter() - started,
    )


def kb_fingerprint(kb_dir: Path | None) -> str:
    """Cheap change detector of a knowledge base: names, sizes and mtimes of its documents."""
    if kb_dir is None or not kb_dir.is_dir():
        return ""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in kb_dir.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(kb_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class DomainModels:
    """Per-tenant models, built on first use and rebuilt when the knowledge base changes.

    ``kb_dirs`` maps a tenant to its knowledge base; other tenants get ``default_kb``
    (the demo's, as the node's retrieval does). Builds run in a worker thread (about a
    second of CPU): a call never waits on one except the very first of its tenant.
    """

    def __init__(
        self,
        kb_dirs: Mapping[str, Path] | None = None,
        *,
        default_kb: Path | None = DEMO_KB_DIR,
        check_every_s: float = 5.0,
        builder: Callable[[str, Path | None, Path], DomainModel] = build_domain_model,
    ) -> None:
        self._kb_dirs = dict(kb_dirs or {})
        self._default_kb = default_kb
        self._check_every_s = check_every_s
        self._builder = builder
        self._dir = Path(tempfile.mkdtemp(prefix="callmesh-lm-"))
        self._models: dict[str, tuple[str, DomainModel]] = {}  # tenant → (fingerprint, model)
        self._checked: dict[str, float] = {}
        self._building: dict[str, asyncio.Task[DomainModel]] = {}

    def kb_dir(self, tenant: str) -> Path | None:
        return self._kb_dirs.get(tenant, self._default_kb)

    async def get(self, tenant: str) -> DomainModel:
        """The tenant's current model (built now if it has none yet)."""
        cached = self._models.get(tenant)
        if cached is None:
            return await self._rebuild(tenant)
        now = time.monotonic()
        if now - self._checked.get(tenant, 0.0) >= self._check_every_s:
            self._checked[tenant] = now
            if kb_fingerprint(self.kb_dir(tenant)) != cached[0] and tenant not in self._building:
                # Calls keep the old model until the new one is ready.
                self._start_build(tenant)
        return cached[1]

    async def refresh(self, tenant: str) -> DomainModel:
        """Rebuild now if the knowledge base changed; the model in use afterwards."""
        cached = self._models.get(tenant)
        if cached is None or kb_fingerprint(self.kb_dir(tenant)) != cached[0]:
            return await self._rebuild(tenant)
        return cached[1]

    def _start_build(self, tenant: str) -> asyncio.Task[DomainModel]:
        task = self._building.get(tenant)
        if task is None:
            task = asyncio.create_task(self._build(tenant), name=f"domain-lm:{tenant}")
            self._building[tenant] = task
            task.add_done_callback(lambda _t: self._building.pop(tenant, None))
        return task

    async def _rebuild(self, tenant: str) -> DomainModel:
        return await asyncio.shield(self._start_build(tenant))

    async def _build(self, tenant: str) -> DomainModel:
        kb_dir = self.kb_dir(tenant)
        fingerprint = kb_fingerprint(kb_dir)
        model = await asyncio.to_thread(self._builder, tenant, kb_dir, self._dir / tenant)
        self._models[tenant] = (fingerprint, model)
        self._checked[tenant] = time.monotonic()
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

    async def aclose(self) -> None:
        for task in list(self._building.values()):
            task.cancel()
        await asyncio.gather(*self._building.values(), return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, self._dir, True)

    def __repr__(self) -> str:
        return f"<DomainModels {sorted(self._models)} in {self._dir}>"
