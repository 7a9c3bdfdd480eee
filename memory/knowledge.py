"""A local knowledge base: Markdown and YAML documents indexed with BM25 (``bm25s``).

The index is built once (at node start) and queried synchronously: a query over 10,000
passages takes well under a millisecond, less than handing it to a thread would cost, so
the knowledge base source calls :meth:`KnowledgeBase.search` directly on the event loop.

Documents are cut into passages so that a retrieved snippet is short enough for the prompt:
a Markdown file gives one passage per ``##`` section (titled ``"File title — Section"``);
a YAML file has a ``title``, optional ``tags`` and either a ``body`` string or a list of
``entries`` (mappings), each entry becoming one passage rendered as ``key: value; ...``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bm25s
import numpy as np
import yaml
from bm25s.stopwords import STOPWORDS_EN

from memory.errors import KnowledgeBaseError

DEMO_KB_DIR = Path(__file__).parent / "kb" / "demo"
SUFFIXES = (".md", ".markdown", ".yaml", ".yml")

_WORD = re.compile(r"[a-z0-9$]+(?:[.'][a-z0-9]+)*")
# Conversational filler too: "yes please do" must not retrieve the one FAQ answer that
# starts with "Yes".
_FILLER = "yes yeah yep no nope ok okay sure please thanks thank hi hello bye um uh just well"
_STOPWORDS = (
    frozenset(STOPWORDS_EN) | {"s", "t", "d", "ll", "ve", "re", "m"} | frozenset(_FILLER.split())
)


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable unit: a Markdown section or a YAML entry."""

    doc_id: str  # "prices.yaml#2": file relative to the knowledge base root, and index
    title: str
    text: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Hit:
    passage: Passage
    score: float


def _stem(word: str) -> str:
    # A few suffix rules instead of a stemming library: enough for "cancellation" to meet
    # "cancel" and "prices" to meet "price"; the same rules run on queries and passages,
    # so their mistakes cancel out.
    if len(word) <= 3:
        return word
    if word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith(("sses", "xes", "ches", "shes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ation", "ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    if word.endswith("ll") and len(word) > 4:  # cancell(ation) → cancel
        word = word[:-1]
    if word.endswith("e") and len(word) > 3:  # schedule / scheduled → schedul
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lower-cased, stop-word-free, lightly stemmed terms (used for queries and passages)."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class KnowledgeBase:
    """A BM25 index over passages. Immutable once built; safe to share between calls."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        self._passages = tuple(passages)
        corpus = [tokenize(f"{p.title} {p.text} {' '.join(p.tags)}") for p in self._passages]
        self._bm25: bm25s.BM25 | None = None
        self._vocab: dict[str, int] = {}
        if any(corpus):
            self._bm25 = bm25s.BM25(method="lucene")
            self._bm25.index(corpus, show_progress=False)
            self._vocab = self._bm25.vocab_dict

    @classmethod
    def from_directory(cls, root: str | Path) -> KnowledgeBase:
        """Index every ``.md``/``.yaml`` document under ``root`` (recursively)."""
        return cls(load_passages(root))

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The ``k`` best passages for ``query``, best first; only passages sharing a term
        with the query (an unrelated query returns nothing rather than noise)."""
        if self._bm25 is None or k < 1:
            return []
        ids = sorted({self._vocab[t] for t in tokenize(query) if t in self._vocab})
        if not ids:
            return []
        scores = self._bm25.get_scores_from_ids(ids)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(self._passages[i], float(scores[i])) for i in top if scores[i] > 0]

    def __len__(self) -> int:
        return len(self._passages)

    def __repr__(self) -> str:
        return f"<KnowledgeBase [{len(self._passages)} passages, {len(self._vocab)} terms]>"


# ---------------------------------------------------------------- loading documents


def load_passages(root: str | Path) -> list[Passage]:
    """Read the documents of a knowledge base directory, in a stable (sorted) order."""
    base = Path(root)
    if not base.is_dir():
        raise KnowledgeBaseError(f"knowledge base directory not found: {base}")
    passages: list[Passage] = []
    for path in sorted(p for p in base.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        rel = path.relative_to(base).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KnowledgeBaseError(f"{rel}: cannot read: {exc}") from exc
        if path.suffix in (".md", ".markdown"):
            passages.extend(_markdown_passages(rel, text))
        else:
            passages.extend(_yaml_passages(rel, text))
    return passages


def _markdown_passages(rel: str, text: str) -> Iterable[Passage]:
    title = Path(rel).stem.replace("-", " ").capitalize()
    section, n = "", 0
    lines: list[str] = []
    out: list[Passage] = []

    def flush() -> None:
        nonlocal n
        body = " ".join(line.strip() for line in lines if line.strip())
        if body:
            name = f"{title} — {section}" if section else title
            out.append(Passage(f"{rel}#{n}", name, body))
            n += 1

    for line in text.splitlines():
        if line.startswith("# "):
            title = line[2:].strip()
        elif line.startswith("## "):
            flush()
            section, lines = line[3:].strip(), []
        else:
            lines.append(line)
    flush()
    return out


def _yaml_passages(rel: str, text: str) -> Iterable[Passage]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KnowledgeBaseError(f"{rel}: invalid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("title"), str):
        raise KnowledgeBaseError(f"{rel}: a YAML document needs a mapping with a 'title'")
    title: str = doc["title"]
    tags = tuple(str(t) for t in doc.get("tags") or ())
    if isinstance(doc.get("body"), str):
        return [Passage(f"{rel}#0", title, " ".join(doc["body"].split()), tags)]
    entries = doc.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise KnowledgeBaseError(f"{rel}: needs a 'body' string or a list of 'entries' mappings")
    return [
        Passage(f"{rel}#{i}", title, "; ".join(f"{k}: {_flat(v)}" for k, v in e.items()), tags)
        for i, e in enumerate(entries)
    ]


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_flat(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_flat(v)}" for k, v in value.items())
    return " ".join(str(value).split())


# ---------------------------------------------------------------- synthetic corpus

_TOPICS = (
    "billing", "refund", "insurance", "orthodontics", "implant", "whitening", "cleaning",
    "x-ray", "parking", "payment plan", "warranty", "referral", "hygiene", "anesthesia",
    "emergency", "pediatric", "sedation", "veneers", "retainer", "gum care",
)  # fmt: skip
_WORDS = (  # noqa: SIM905 (a word list reads better as prose)
    "appointment patient visit clinic office policy coverage plan fee deposit schedule "
    "morning afternoon evening weekday weekend branch doctor hygienist assistant form "
    "record consent follow-up treatment estimate claim provider network annual limit "
    "deductible copay waiting period exception approval document email phone reminder "
    "confirmation reschedule late notice charge discount member family senior student"
).split()


def synthetic_passages(n: int, *, seed: int = 7) -> list[Passage]:
    """``n`` deterministic, plausible-looking policy passages: the benchmark's 10,000-doc
    knowledge base (the same seed always gives the same corpus)."""
    rng = random.Random(seed)
    out: list[Passage] = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        words = " ".join(rng.choices(_WORDS, k=rng.randint(25, 60)))
        title = f"{topic.capitalize()} policy {i}"
        text = f"Rule {i} about {topic}: {words}. Fee ${rng.randint(10, 900)}."
        out.append(Passage(f"synthetic/{i}", title, text, (topic,)))
    return out
