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
    assert "perplexity" in capsys.readouterr().out


def test_eval_bad_input_is_a_clear_error(caplog):
    assert main(["eval", "mixtral-s", "--split", "wikitxt"]) == 2
    assert "did you mean 'wikitext2'" in caplog.text
    assert main(["eval", "mixtral-s", "--limit", "5"]) == 2
    assert "--tasks" in caplog.text
    assert main(["eval", "mixtral-s", "--tasks", "qmoe_endng", "--limit", "5"]) == 2
    assert "did you mean 'qmoe_ending'" in caplog.text
