"""A sweep shows one progress line of its own; library bars stay quiet under it."""

import logging

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

from quantmoe.bench.runner import run_sweep
from quantmoe.bench.sweep import sweep_from_dict
from quantmoe.progress import quiet_library_bars, quiet_loggers


def test_quiet_library_bars_disables_bars_created_inside_only():
    with quiet_library_bars():
        assert tqdm(range(3)).disable and auto_tqdm(range(3)).disable
        assert tqdm(range(3), disable=False).disable  # even when asked for
    bar = tqdm(range(3), disable=False)
    assert not bar.disable
    bar.close()


def test_quiet_loggers_restores_levels():
    lg = logging.getLogger("quantmoe.test.chatter")
    lg.setLevel(logging.DEBUG)
    with quiet_loggers(("quantmoe.test.chatter",)):
        assert not lg.isEnabledFor(logging.INFO) and lg.isEnabledFor(logging.WARNING)
    assert lg.level == logging.DEBUG


def test_sweep_progress_is_one_line_with_count_and_eta(tmp_path, tiny_model_dir, capsys, caplog):
    config = sweep_from_dict({
        "name": "tiny", "models": [str(tiny_model_dir)], "seeds": [0],
        "calibration": {"num_windows": 2, "seq_len": 32},
        "eval": {"perplexity": {"split": "test", "seq_len": 32, "max_windows": 2}, "tasks": ["qmoe_cloze"],
                 "task_limit": 2},
        "statistics": {"windows": 2, "seq_len": 32},
        "runs": [{"name": "full precision", "full_precision": True}, {"name": "u4", "policy": "uniform=4"}]})
    with caplog.at_level(logging.INFO):
        run_sweep(config, tmp_path / "r.sqlite", cache_dir=tmp_path / "cache", progress=True)
    err = capsys.readouterr().err
    assert "run 2 of 2" in err and "ETA" in err
    assert "loglikelihood" not in err and "Loading weights" not in err  # lm-eval's and transformers' bars
    line = next(r.getMessage() for r in caplog.records if "| u4 seed 0:" in r.getMessage())
    assert "quantize" in line and "evaluate" in line
    # a resumed sweep counts only what is left
    more = sweep_from_dict({
        "name": "tiny", "models": [str(tiny_model_dir)], "seeds": [0],
        "calibration": {"num_windows": 2, "seq_len": 32},
        "eval": {"perplexity": {"split": "test", "seq_len": 32, "max_windows": 2}, "tasks": ["qmoe_cloze"],
                 "task_limit": 2},
        "statistics": {"windows": 2, "seq_len": 32},
        "runs": [{"name": "full precision", "full_precision": True}, {"name": "u4", "policy": "uniform=4"},
                 {"name": "u8", "policy": "uniform=8"}]})
    run_sweep(more, tmp_path / "r.sqlite", cache_dir=tmp_path / "cache", progress=True)
    err = capsys.readouterr().err
    assert "run 1 of 1" in err and "run 1 of 3" not in err
