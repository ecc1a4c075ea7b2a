import yaml

from quantmoe.bench.store import ResultsStore
from quantmoe.demo import demo_sweep_path, run_demo


def test_demo_sweep_is_shipped():
    assert demo_sweep_path().is_file()


def test_demo_runs_a_sweep_and_writes_the_report(tmp_path, capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("QUANTMOE_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir
    sweep = tmp_path / "demo.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "demo-test", "models": [str(model_dir)], "seeds": [0, 1, 2],
        "calibration": {"num_windows": 4, "seq_len": 64},
        "eval": {"perplexity": {"seq_len": 64, "max_windows": 4}},
        "runs": [{"name": "full precision", "full_precision": True},
                 {"name": "uniform 3-bit", "policy": "uniform=3"}]}))
    store = tmp_path / "out" / "results.sqlite"
    assert run_demo(sweep=sweep, store=store) == 0
    out = capsys.readouterr().out
    assert "| uniform 3-bit | 3.000 |" in out and "demo finished" in out
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    with ResultsStore(store, create=False) as results:
        assert len(results.records()) == 4
