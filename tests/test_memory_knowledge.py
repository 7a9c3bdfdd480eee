"""The BM25 knowledge base: loading Markdown/YAML documents and retrieval quality on the
demo knowledge base that ships with the project."""

from __future__ import annotations

from pathlib import Path

import pytest

from memory.errors import KnowledgeBaseError
from memory.knowledge import (
    DEMO_KB_DIR,
    KnowledgeBase,
    load_passages,
    synthetic_passages,
    tokenize,
)


@pytest.fixture(scope="module")
def demo_kb() -> KnowledgeBase:
    return KnowledgeBase.from_directory(DEMO_KB_DIR)


def test_demo_kb_ships_markdown_and_yaml_documents() -> None:
    files = {p.name for p in DEMO_KB_DIR.iterdir()}
    assert 10 <= len(files) <= 20
    assert {".md", ".yaml"} <= {Path(f).suffix for f in files}
    passages = load_passages(DEMO_KB_DIR)
    assert len({p.doc_id for p in passages}) == len(passages)
    assert all(p.text and p.title for p in passages)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("how much does a cleaning cost", "prices.yaml"),
        ("what is the fee if I cancel late", "cancellation-policy.md"),
        ("do you accept Cigna insurance", "insurance-faq.yaml"),
        ("is whitening covered by my insurance", "insurance-faq.yaml"),
        ("when are you open on Saturday", "hours.yaml"),
        ("where can I park at the Riverside office", "locations.yaml"),
        ("can I split the payment into monthly payments", "payment.md"),
        ("I knocked out a tooth, is this an emergency", "emergencies.md"),
        ("can I move my appointment to another day", "rescheduling.md"),
    ],
)
def test_best_passage_comes_from_the_right_document(
    demo_kb: KnowledgeBase, query: str, expected: str
) -> None:
    hits = demo_kb.search(query, k=3)
    assert hits, query
    assert hits[0].passage.doc_id.startswith(expected + "#"), [h.passage.doc_id for h in hits]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_price_snippet_carries_the_price(demo_kb: KnowledgeBase) -> None:
    top = demo_kb.search("price of a cleaning", k=1)[0].passage
    assert "$120" in top.text


@pytest.mark.parametrize("query", ["yes please", "zebra quantum", "", "   "])
def test_unrelated_or_empty_queries_return_nothing(demo_kb: KnowledgeBase, query: str) -> None:
    assert demo_kb.search(query) == []


def test_stemming_meets_word_forms() -> None:
    assert tokenize("cancellation cancelled cancel") == ["cancel"] * 3
    assert tokenize("prices price") == tokenize("price price")
    assert len(set(tokenize("schedule scheduled scheduling schedules"))) == 1
    assert tokenize("yes please, thanks") == []


def test_synthetic_corpus_is_deterministic_and_searchable() -> None:
    first, again = synthetic_passages(500), synthetic_passages(500)
    assert first == again and len({p.doc_id for p in first}) == 500
    kb = KnowledgeBase(first)
    hits = kb.search("orthodontics", k=5)
    assert hits and all("orthodontics" in h.passage.tags for h in hits)


def test_empty_knowledge_base_answers_nothing(tmp_path: Path) -> None:
    kb = KnowledgeBase.from_directory(tmp_path)
    assert len(kb) == 0 and kb.search("cleaning") == []


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("bad.yaml", "title: [unclosed", "invalid YAML"),
        ("notitle.yaml", "entries: []", "title"),
        ("noentries.yaml", "title: X\nentries: 3", "entries"),
    ],
)
def test_invalid_documents_are_refused(tmp_path: Path, name: str, text: str, error: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(KnowledgeBaseError, match=error):
        KnowledgeBase.from_directory(tmp_path)


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeBaseError, match="not found"):
        load_passages(tmp_path / "nope")


def test_markdown_sections_become_passages(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\nIntro text.\n\n## Part one\nAlpha.\n## Two\nBeta.\n")
    (tmp_path / "b.yaml").write_text("title: B\nbody: |\n  Gamma\n  delta.\n")
    passages = load_passages(tmp_path)
    assert [(p.doc_id, p.title, p.text) for p in passages] == [
        ("a.md#0", "Title", "Intro text."),
        ("a.md#1", "Title — Part one", "Alpha."),
        ("a.md#2", "Title — Two", "Beta."),
        ("b.yaml#0", "B", "Gamma delta."),
    ]
