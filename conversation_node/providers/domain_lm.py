"""A tenant's recognizer language model: a trigram ARPA model and its pronunciations.

pocketsphinx with its generic English model mis-hears most of a receptionist call (word
error rate 0.87 measured); the same acoustic model constrained to what callers of this
tenant say does far better. :func:`build_domain_model` turns the tenant's corpus
(:mod:`~conversation_node.providers.domain_corpus`) into:

* an ARPA trigram model with interpolated Witten-Bell smoothing (forgiving: any word
  sequence of the vocabulary keeps a small probability, unlike a grammar);
* a pronunciation dictionary of just those words, from the CMU dictionary shipped with
  pocketsphinx (a small dictionary is what makes a decoder cheap to create).

A build is a few tens of milliseconds of CPU (the demo's: 0.04 s, plus 0.17 s to read the
CMU dictionary once). :class:`~conversation_node.providers.domain_models.DomainModels`
keeps the models of a node's tenants and rebuilds one when its knowledge base changes.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from conversation_node.providers.domain_corpus import booking_sentences, kb_sentences, kb_services
from memory.knowledge import load_passages

__all__ = ["DomainModel", "arpa_trigram", "build_domain_model"]

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
    source: str = ""  # digest of the knowledge base it was built from (memory.tenant_kb)

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
    passages = load_passages(kb_dir) if kb_dir is not None else []
    corpus = list(booking_sentences(services=kb_services(passages)))
    corpus += list(kb_sentences(passages))
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
