"""The local lm-eval task suite of the embedded models, built from held-out text.

Two tasks over the embedded ``test`` split, written as JSONL beside their lm-eval YAML
files in ``embedded/tasks/``:

- ``qmoe_ending`` (multiple choice, chance 0.25): the text before a line and the first
  half of the line; pick the line's real second half among 4. The 3 distractors are
  second halves of lines of the same source (Shakespeare, KJV, Python docs) from other
  documents, so that style alone does not give the answer away.
- ``qmoe_cloze`` (LAMBADA-style): the text before a line's last word, where that word
  already occurs in the text; the model must produce it by greedy decoding.

Only the text decides which lines become items (no model is consulted), so the suite
favours no model. The builder is seeded: the same text and seed give the same bytes.

Example::

    >>> text = Path("embedded/data/test.txt").read_text(encoding="utf-8")  # doctest: +SKIP
    >>> build_suite(text, Path("embedded/tasks"))  # doctest: +SKIP
    {'qmoe_ending': 300, 'qmoe_cloze': 300}
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantmoe.atomic import atomic_write_text
from quantmoe.data import DOC_SEPARATOR

SUITE_TASKS = ("qmoe_ending", "qmoe_cloze")
N_CHOICES = 4
ENDING_CONTEXT_CHARS = 150  # text shown before the line (whole lines, at least one)
CLOZE_CONTEXT_CHARS = 400
MIN_CHARS, MAX_CHARS, MIN_WORDS = 25, 160, 5

_VERSE_NUMBER = re.compile(r"^\d+ ")
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[^A-Za-z\s]*$")


@dataclass(frozen=True)
class Line:
    source: str
    doc: int  # document index in the split
    index: int  # line index in the document
    text: str  # stripped


def source_of(doc: str) -> str:
    """Which corpus a test document comes from: verse-numbered lines are the KJV, reST
    markup is the Python docs, the rest is Shakespeare."""
    lines = [line for line in doc.splitlines() if line.strip()]
    if sum(bool(_VERSE_NUMBER.match(line)) for line in lines) >= 0.5 * len(lines):
        return "kjv"
    if re.search(r"^\.\. |``|::$", doc, re.MULTILINE):
        return "python-docs"
    return "shakespeare"


def is_prose_line(text: str) -> bool:
    """A line worth predicting: a sentence-like line of text, not code, markup or a name."""
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return MIN_CHARS <= len(text) <= MAX_CHARS and len(text.split()) >= MIN_WORDS and letters >= 0.8 * len(text)


def split_documents(text: str) -> list[str]:
    return [d.strip("\n") for d in text.split(DOC_SEPARATOR) if d.strip()]


def prose_lines(docs: list[str]) -> list[Line]:
    """Candidate lines, in order; the first line of a document is skipped (no context)."""
    return [Line(source_of(doc), d, i, raw.strip())
            for d, doc in enumerate(docs) for i, raw in enumerate(doc.splitlines())
            if i > 0 and is_prose_line(raw.strip())]


def text_before(doc: str, index: int, max_chars: int) -> str:
    """The whole lines before line ``index`` that fit in ``max_chars`` (at least one),
    each ending with a newline."""
    kept: list[str] = []
    size = 0
    for line in reversed(doc.splitlines()[:index]):
        if kept and size + len(line) + 1 > max_chars:
            break
        kept.append(line)
        size += len(line) + 1
    return "".join(line + "\n" for line in reversed(kept))


def split_half(text: str) -> tuple[str, str]:
    """A line cut at the middle word boundary: ``("Go with me", "to my chamber")``."""
    words = text.split(" ")
    k = len(words) // 2
    return " ".join(words[:k]), " ".join(words[k:])


def _by_source(lines: list[Line]) -> dict[str, list[Line]]:
    out: dict[str, list[Line]] = {}
    for line in lines:
        out.setdefault(line.source, []).append(line)
    return out


def _distractors(rng: random.Random, pool: list[Line], target: Line, value: Callable[[Line], str],
                 n: int) -> list[str]:
    """``n`` distinct values of lines from other documents of the same source."""
    others = [line for line in pool if line.doc != target.doc]
    out: list[str] = []
    seen = {value(target).lower()}
    for other in rng.sample(others, len(others)):
        v = value(other)
        if v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
            if len(out) == n:
                return out
    raise ValueError(f"too few {target.source} lines for {n} distractors: use a larger text")


def _sample(rng: random.Random, lines: list[Line], n_items: int, task: str) -> list[Line]:
    if n_items > len(lines):
        raise ValueError(f"check `n_items`: {task} has only {len(lines)} eligible lines, not {n_items}")
    return rng.sample(lines, n_items)


def ending_items(docs: list[str], n_items: int, seed: int) -> list[dict]:
    """Text before a line plus its first half; the real second half among 4."""
    rng = random.Random(f"qmoe_ending/{seed}")
    lines = prose_lines(docs)
    pool = _by_source(lines)
    items = []
    for n, target in enumerate(_sample(rng, lines, n_items, "qmoe_ending")):
        head, tail = split_half(target.text)
        choices = [tail, *_distractors(rng, pool[target.source], target, lambda line: split_half(line.text)[1],
                                       N_CHOICES - 1)]
        rng.shuffle(choices)
        items.append({"id": f"qmoe_ending-{n:04d}", "source": target.source,
                      "context": text_before(docs[target.doc], target.index, ENDING_CONTEXT_CHARS) + head,
                      "choices": choices, "label": choices.index(tail)})
    return items


def cloze_items(docs: list[str], n_items: int, seed: int) -> list[dict]:
    """Text before a line's last word (trailing punctuation dropped) where the word
    already occurs in that text; the word is the target."""
    rng = random.Random(f"qmoe_cloze/{seed}")
    candidates = []
    for line in prose_lines(docs):
        m = _LAST_WORD.match(line.text)
        if m is None:
            continue
        context = text_before(docs[line.doc], line.index, CLOZE_CONTEXT_CHARS) + m.group(1)
        if re.search(rf"\b{m.group(2)}\b", context):
            candidates.append((line, context, m.group(2)))
    picked = _sample(rng, list(range(len(candidates))), n_items, "qmoe_cloze")
    return [{"id": f"qmoe_cloze-{n:04d}", "source": candidates[i][0].source, "context": candidates[i][1],
             "target": candidates[i][2]} for n, i in enumerate(picked)]


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def build_suite(text: str, out_dir: Path, n_items: int = 300, seed: int = 0) -> dict[str, int]:
    """Write ``<task>.jsonl`` for every suite task into ``out_dir``; returns items per task."""
    if n_items < 1:
        raise ValueError(f"check `n_items`: {n_items} is not a positive number of items")
    docs = split_documents(text)
    built = {"qmoe_ending": ending_items(docs, n_items, seed), "qmoe_cloze": cloze_items(docs, n_items, seed)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, items in built.items():
        atomic_write_text(out_dir / f"{task}.jsonl", _jsonl(items))
    return {task: len(items) for task, items in built.items()}
