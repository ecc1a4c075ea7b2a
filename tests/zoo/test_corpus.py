from quantmoe.data import split_path
from quantmoe.zoo.corpus import DOC_SEPARATOR, SPLITS, Document, _chunks


def test_split_assignment_is_stable_and_mostly_train():
    docs = [Document("kjv", i, "x") for i in range(4000)]
    splits = [d.split for d in docs]
    assert splits == [Document("kjv", i, "y").split for i in range(4000)]
    for name in SPLITS:
        assert 20 < splits.count(name) < 120  # 1.5% each
    assert splits.count("train") > 3700


def test_chunks_keep_paragraphs_whole():
    text = "\n\n".join(f"paragraph {i} " + "w" * 400 for i in range(10))
    chunks = _chunks(text)
    assert len(chunks) == 3
    assert "".join(c.replace("\n\n", "") for c in chunks) == text.replace("\n\n", "")


def test_committed_splits_are_disjoint():
    docs = {name: set(split_path(name).read_text().split(DOC_SEPARATOR)) for name in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                shared = {d for d in docs[a] & docs[b] if len(d) > 200}
                assert not shared, f"{a} and {b} share documents"
    assert all(len(v) > 50 for v in docs.values())
