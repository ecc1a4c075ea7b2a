import json

import pytest

from quantmoe.data import split_path
from quantmoe.models import embedded_root
from quantmoe.zoo.suite import (
    SUITE_TASKS,
    build_suite,
    cloze_items,
    ending_items,
    prose_lines,
    source_of,
    split_documents,
    split_half,
)


@pytest.fixture(scope="module")
def docs():
    return split_documents(split_path("test").read_text(encoding="utf-8"))


def test_committed_suite_is_what_the_builder_makes(tmp_path):
    counts = build_suite(split_path("test").read_text(encoding="utf-8"), tmp_path)
    assert counts == {task: 300 for task in SUITE_TASKS}
    for task in SUITE_TASKS:
        assert (tmp_path / f"{task}.jsonl").read_bytes() == (embedded_root() / "tasks" / f"{task}.jsonl").read_bytes()
        assert (embedded_root() / "tasks" / f"{task}.yaml").is_file()


def test_sources_and_lines(docs):
    sources = [source_of(d) for d in docs]
    assert set(sources) == {"shakespeare", "kjv", "python-docs"}
    assert sources == sorted(sources, key=["shakespeare", "kjv", "python-docs"].index)  # written in that order
    assert split_half("Go with me to my chamber") == ("Go with me", "to my chamber")
    lines = prose_lines(docs)
    assert all(line.index > 0 and len(line.text.split()) >= 5 for line in lines)


def test_ending_items(docs):
    items = ending_items(docs, 50, seed=1)
    assert items == ending_items(docs, 50, seed=1)
    assert items != ending_items(docs, 50, seed=2)
    halves = {}
    for line in prose_lines(docs):
        halves.setdefault(split_half(line.text)[1], set()).add((line.source, line.doc))
    labels = set()
    for item in items:
        assert len(item["choices"]) == 4 and len({c.lower() for c in item["choices"]}) == 4
        labels.add(item["label"])
        answer = item["choices"][item["label"]]
        assert any(s == item["source"] for s, _ in halves[answer])
        for c in item["choices"]:  # distractors: same source, another document
            assert any(s == item["source"] for s, _ in halves[c])
    assert labels == {0, 1, 2, 3}


def test_cloze_items(docs):
    items = cloze_items(docs, 50, seed=0)
    for item in items:
        assert item["target"].isalpha() and len(item["target"]) >= 3
        assert item["target"] in item["context"] and not item["context"].endswith(" ")
    json.dumps(items)
    with pytest.raises(ValueError, match="n_items"):
        cloze_items(docs, 10**6, seed=0)
