import math
import re

import pytest

from quantmoe.cli import main


def test_eval_runs_lm_eval_tasks(capsys):
    assert main(["eval", "mixtral-s", "--tasks", "qmoe_ending", "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "qmoe_ending" in out and "acc_norm" in out and "mean" in out
    assert "perplexity" not in out  # --tasks alone: no perplexity


def test_eval_perplexity_on_a_text_file(tmp_path, capsys):
    from quantmoe.data import split_path

    path = tmp_path / "few.txt"
    path.write_text(split_path("test").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    assert main(["eval", "mixtral-s", "--split", str(path), "--seq-len", "64", "--max-windows", "4"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"perplexity ([0-9.]+) over ([0-9,]+) predicted tokens", out)
    assert match, out
    # the printed value is the model's perplexity on the first 4 windows of 64 tokens of the file
    import torch

    from quantmoe.data.corpora import load_tokens
    from quantmoe.models import load_model

    model, tokenizer = load_model("mixtral-s")
    ids = torch.as_tensor(load_tokens(str(path), tokenizer)[:4 * 64], dtype=torch.long).reshape(4, 64)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert float(match.group(1)) == pytest.approx(math.exp(nll.item()), abs=1e-3)
    assert int(match.group(2).replace(",", "")) == 4 * 63


def test_eval_bad_input_is_a_clear_error(caplog):
    assert main(["eval", "mixtral-s", "--split", "wikitxt"]) == 2
    assert "did you mean 'wikitext2'" in caplog.text
    assert main(["eval", "mixtral-s", "--limit", "5"]) == 2
    assert "--tasks" in caplog.text
    assert main(["eval", "mixtral-s", "--tasks", "qmoe_endng", "--limit", "5"]) == 2
    assert "did you mean 'qmoe_ending'" in caplog.text
