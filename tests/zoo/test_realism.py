from quantmoe.zoo.realism import RealismRow, check_targets, realism_markdown


def _rows(kl_by_bits, ppl_by_bits):
    rows = []
    for bits in (2, 3, 4, 8):
        for sym in (False, True):
            for group in (128, None):
                rows.append(RealismRow("all", bits, group, sym, 100 * (1 + ppl_by_bits[bits] / 100),
                                       ppl_by_bits[bits], kl_by_bits[bits], 10 * kl_by_bits[bits], 0.9))
    return rows


def test_targets_met_and_missed():
    good = _rows({2: 0.3, 3: 0.05, 4: 0.01, 8: 0.001}, {2: 40.0, 3: 4.0, 4: 1.0, 8: 0.0})
    assert all(ok for _, ok in check_targets(good))
    bad = _rows({2: 0.3, 3: 0.2, 4: 0.01, 8: 0.001}, {2: 10.0, 3: 4.0, 4: 3.0, 8: 0.0})
    failed = [text for text, ok in check_targets(bad) if not ok]
    assert any(t.startswith("2-bit") for t in failed)
    assert any(t.startswith("4-bit") for t in failed)
    assert any(t.startswith("KL ratio") for t in failed)
    text = realism_markdown(100.0, bad)
    assert "- [ ] 2-bit" in text and "| all | 2 | per-channel | asym |" in text
