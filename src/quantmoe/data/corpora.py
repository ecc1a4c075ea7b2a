"""Named perplexity corpora: the embedded splits, local text files and hub corpora.

``wikitext2`` and ``c4`` follow the GPTQ paper's convention (and its reference code), so
that perplexities are comparable with the literature:

- wikitext2: ``wikitext`` / ``wikitext-2-raw-v1``, test split, rows joined by "\\n\\n".
- c4: ``allenai/c4``, English validation shard 0 of 8, the first 1100 documents joined
  by a space (then cut into as many windows as asked, GPTQ takes 256 of 2048 tokens).

Hub corpora go through one function, ``dataset_text``, which is all that calls
``datasets.load_dataset``; the ``datasets`` cache stays in the work tree
(``ensure_datasets_cache``). Offline, a hub corpus must already be in that cache.

Example::

    >>> text = load_text("test")  # embedded split  # doctest: +SKIP
    >>> ids = load_tokens("wikitext2", tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantmoe.data import TEXT_SPLITS, split_path, tokenize_text
from quantmoe.data.hfcache import ensure_datasets_cache
from quantmoe.suggest import did_you_mean


@dataclass(frozen=True)
class HubCorpus:
    """Where a corpus lives for ``datasets.load_dataset`` and how its rows become one text."""

    path: str  # dataset id or packaged builder ("text", "json")
    split: str
    name: str | None = None  # configuration
    data_files: dict[str, str] = field(default_factory=dict)
    column: str = "text"
    separator: str = "\n\n"
    max_rows: int | None = None  # the first rows only

    def __post_init__(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"check `max_rows`: {self.max_rows} is not a positive number of rows")


C4_DOCS = 1100
HUB_CORPORA: dict[str, HubCorpus] = {
    "wikitext2": HubCorpus("wikitext", "test", name="wikitext-2-raw-v1"),
    "c4": HubCorpus("allenai/c4", "validation",
                    data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                    separator=" ", max_rows=C4_DOCS),
}


def corpus_names() -> tuple[str, ...]:
    return (*TEXT_SPLITS, *HUB_CORPORA)


def dataset_text(corpus: HubCorpus) -> str:
    """The text of a ``datasets`` corpus: one column of its first rows, joined."""
    ensure_datasets_cache()
    import datasets

    data = datasets.load_dataset(corpus.path, corpus.name, data_files=corpus.data_files or None, split=corpus.split)
    if corpus.column not in data.column_names:
        raise ValueError(f"{corpus.path} has no column {corpus.column!r}: it has {', '.join(data.column_names)}")
    if corpus.max_rows is not None:
        data = data.select(range(min(corpus.max_rows, len(data))))
    return corpus.separator.join(data[corpus.column])


def _unknown(source: str) -> ValueError:
    hint = did_you_mean(source, corpus_names(), n=2)
    hint = f"{hint} " if hint else ""
    return ValueError(f"unknown text {source!r}: {hint}give one of {', '.join(corpus_names())} "
                      "or the path of a .txt file")


def _local_path(source: str) -> Path | None:
    path = Path(source).expanduser()
    return path if path.suffix == ".txt" or path.is_file() else None


def load_text(source: str) -> str:
    """The text of an embedded split, a hub corpus (``HUB_CORPORA``) or a local file."""
    if source in TEXT_SPLITS:
        return split_path(source).read_text(encoding="utf-8")
    if source in HUB_CORPORA:
        return dataset_text(HUB_CORPORA[source])
    path = _local_path(source)
    if path is None:
        raise _unknown(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {err.start}): convert it, e.g. "
                         f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`") from None


def load_tokens(source: str, tokenizer) -> np.ndarray:
    """Token ids of ``load_text(source)``.

    Embedded splits and local files are split into documents at blank-line triples and
    joined with end-of-text, as the embedded models were trained; a hub corpus is one
    text, tokenized as a whole (the GPTQ convention), without special tokens.
    """
    text = load_text(source)
    if not text.strip():
        raise ValueError(f"the text {source!r} is empty (or only whitespace): give a text with content")
    if source in HUB_CORPORA:
        return np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int32)
    return tokenize_text(tokenizer, text)
