import numpy as np
import pytest

from quantmoe.data import corpora, split_path
from quantmoe.data.corpora import HUB_CORPORA, HubCorpus, dataset_text, load_text, load_tokens


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from quantmoe.models import embedded_root

    return AutoTokenizer.from_pretrained(embedded_root() / "tokenizer")


def test_embedded_split_and_local_file(tmp_path, tokenizer):
    assert load_text("test") == split_path("test").read_text(encoding="utf-8")
    path = tmp_path / "mine.txt"
    path.write_text("First document.\n\n\nSecond one.\n", encoding="utf-8")
    assert load_text(str(path)) == "First document.\n\n\nSecond one.\n"
    ids = load_tokens(str(path), tokenizer)
    assert ids.dtype == np.int32 and (ids == tokenizer.eos_token_id).sum() == 2  # one per document


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'test'"):
        load_text("tset")
    with pytest.raises(ValueError, match="wikitext2"):
        load_text("wikitext")
    with pytest.raises(FileNotFoundError, match="no such text file"):
        load_text(str(tmp_path / "missing.txt"))


def test_hub_conventions():
    wiki, c4 = HUB_CORPORA["wikitext2"], HUB_CORPORA["c4"]
    assert (wiki.path, wiki.name, wiki.split, wiki.separator) == ("wikitext", "wikitext-2-raw-v1", "test", "\n\n")
    assert c4.path == "allenai/c4" and c4.data_files == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert c4.max_rows == 1100 and c4.separator == " "
    with pytest.raises(ValueError, match="max_rows"):
        HubCorpus("text", "train", max_rows=0)


def test_hub_path_runs_on_local_text(tmp_path, monkeypatch, tokenizer):
    """The hub corpora's loader (datasets.load_dataset, rows joined) on a local file: no network."""
    path = tmp_path / "rows.txt"
    path.write_text("row one\nrow two\nrow three\n", encoding="utf-8")
    local = HubCorpus("text", "train", data_files={"train": str(path)}, separator="\n\n", max_rows=2)
    assert dataset_text(local) == "row one\n\nrow two"
    monkeypatch.setitem(HUB_CORPORA, "wikitext2", local)
    assert load_text("wikitext2") == "row one\n\nrow two"
    ids = load_tokens("wikitext2", tokenizer)
    assert tokenizer.decode(ids) == "row one\n\nrow two"  # one text, no special tokens
    with pytest.raises(ValueError, match="no column 'body'"):
        dataset_text(HubCorpus("text", "train", data_files={"train": str(path)}, column="body"))


def test_datasets_cache_defaults_to_the_work_tree(monkeypatch):
    import datasets.config

    from quantmoe.data.hfcache import ensure_datasets_cache
    from quantmoe.models import embedded_root

    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets.config.HF_DATASETS_CACHE)
    path = ensure_datasets_cache()
    assert path == embedded_root().parent / ".cache" / "hf_datasets"
    assert datasets.config.HF_DATASETS_CACHE == path
    monkeypatch.setenv("HF_DATASETS_CACHE", "/elsewhere")
    assert str(ensure_datasets_cache()) == "/elsewhere"
    assert corpora.corpus_names()[:3] == ("calibration", "validation", "test")
