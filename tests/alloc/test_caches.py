"""Every statistics cache is keyed by content: a changed input or setting misses, an identical one hits."""

import dataclasses
import logging

import pytest
import torch

import quantmoe.alloc.damage as damage_module
import quantmoe.alloc.predictor as predictor_module
import quantmoe.calib.routing as routing_module
from quantmoe.alloc.damage import DamageConfig, load_or_measure_damage
from quantmoe.alloc.evidence import StatisticsConfig, gather_evidence
from quantmoe.alloc.predictor import PredictorConfig
from quantmoe.quant.grid import QuantSpec

WORDS = ("the cat sat on a mat and the dog ran to the park while a bird sang over the quiet river bank near "
         "an old mill where children played games until the evening light faded behind the hills ").split()


def _text(path, seed: int):
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (600,), generator=g).tolist()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(words) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from quantmoe.anatomy import describe, tiny_model
    from quantmoe.models import embedded_root

    torch.manual_seed(0)
    model = tiny_model("mixtral", vocab_size=8192)
    return model, AutoTokenizer.from_pretrained(embedded_root() / "tokenizer"), describe(model)


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_statistics_cache_hits_on_identical_inputs_and_misses_on_any_change(tiny, tmp_path, monkeypatch):
    model, tok, anatomy = tiny
    calls = _counting(monkeypatch, routing_module, "collect_routing")
    data_a = _text(tmp_path / "a" / "data.txt", seed=0)
    data_b = _text(tmp_path / "b" / "data.txt", seed=1)  # same file name, other text
    copy_a = _text(tmp_path / "c" / "renamed.txt", seed=0)  # same text, other name
    base = StatisticsConfig(split=data_a, windows=2, seq_len=16)
    cache = tmp_path / "cache"

    def routing(config, model=model):
        return gather_evidence(["routing"], model, tok, anatomy, config, model_name="tiny", cache_dir=cache).routing

    first = routing(base)
    assert len(calls) == 1
    assert routing(base).counts.keys() == first.counts.keys() and len(calls) == 1  # identical: hit
    assert routing(dataclasses.replace(base, split=copy_a)) and len(calls) == 1  # renamed copy: same content, hit
    for i, changed in enumerate([dataclasses.replace(base, split=data_b),  # two data.txt no longer collide
                                 dataclasses.replace(base, windows=3), dataclasses.replace(base, seq_len=12),
                                 dataclasses.replace(base, seed=1)]):
        routing(changed)
        assert len(calls) == 2 + i, f"change {i} hit a stale cache"
    other = type(model)(model.config)  # other weights, same names
    routing(base, model=other)
    assert len(calls) == 6
    assert routing(base).counts.keys() == first.counts.keys() and len(calls) == 6  # still a hit afterwards


def test_massive_and_importance_caches_key_their_settings(tiny, tmp_path, monkeypatch):
    model, tok, anatomy = tiny
    from quantmoe.alloc import scorers

    massive = _counting(monkeypatch, scorers, "massive_routing")
    importance = _counting(monkeypatch, predictor_module, "block_importance")
    fast = PredictorConfig(max_epochs=2, width=8)
    base = StatisticsConfig(windows=2, seq_len=16, predictor=fast)

    def gather(needs, config):
        return gather_evidence(needs, model, tok, anatomy, config, model_name="tiny", cache_dir=tmp_path)

    gather(["massive", "importance"], base)
    gather(["massive", "importance"], base)
    assert (len(massive), len(importance)) == (1, 1)
    gather(["massive"], dataclasses.replace(base, massive_threshold=5.0))
    assert len(massive) == 2
    for i, changed in enumerate([dataclasses.replace(fast, lr=1e-2), dataclasses.replace(fast, width=4),
                                 dataclasses.replace(fast, patience=1)]):
        gather(["importance"], dataclasses.replace(base, predictor=changed))
        assert len(importance) == 2 + i, f"predictor change {i} hit a stale cache"
    gather(["importance"], dataclasses.replace(base, rank_split="test"))
    assert len(importance) == 5


def test_damage_cache_hits_on_identical_inputs_and_misses_on_any_change(tiny, tmp_path, monkeypatch, caplog):
    model, tok, anatomy = tiny
    calls = _counting(monkeypatch, damage_module, "measure_damage")
    base = DamageConfig(windows=2, seq_len=16, group_size=16, metric="output")
    path = tmp_path / "damage.npz"

    def table(config, widths=(2, 4), model=model):
        return load_or_measure_damage(model, tok, anatomy, widths, config, path)

    first = table(base)
    with caplog.at_level(logging.INFO, logger="quantmoe.alloc.damage"):
        again = table(base)
    assert len(calls) == 1 and "damage table from" in caplog.text
    assert (again.damage == first.damage).all()
    assert table(base, widths=(2,)).widths == (2, 4)  # a subset of the measured widths: hit
    assert len(calls) == 1
    changes = [dict(metric="fisher"), dict(group_size=32), dict(group_size=None), dict(symmetric=False),
               dict(windows=3), dict(seq_len=12), dict(seed=1), dict(split="validation"), dict(damp=0.1),
               dict(quantizer="rtn"), dict(moe_mode="all"), dict(act_order="desc"), dict(refine=2)]
    for i, change in enumerate(changes):
        table(dataclasses.replace(base, **change))
        assert len(calls) == 2 + i, f"{change} reused a stale damage table"
    table(base)  # the file now holds the last setting: measured again, then a hit
    table(base)
    assert len(calls) == 2 + len(changes)
    table(base, widths=(2, 3))  # a width not measured
    table(base, model=type(model)(model.config))  # other weights
    assert len(calls) == 4 + len(changes)


def test_damage_cache_refuses_a_file_it_did_not_write(tiny, tmp_path):
    model, tok, anatomy = tiny
    path = tmp_path / "notes.npz"
    path.write_text("my notes", encoding="utf-8")
    with pytest.raises(ValueError, match="not a damage table written by quantmoe"):
        load_or_measure_damage(model, tok, anatomy, (2,), DamageConfig(windows=2, seq_len=16), path)
    assert path.read_text(encoding="utf-8") == "my notes"


def test_solve_command_puts_every_damage_setting_in_the_key(monkeypatch, tmp_path):
    """`quantmoe solve` hands all its damage settings to the content-keyed cache."""
    from quantmoe.cli import build_parser

    seen = {}

    class Stop(Exception):
        pass

    def capture(model, tokenizer, anatomy, widths, config, cache=None, fingerprint=None, menu=()):
        seen.update(config=config, cache=cache, widths=widths)
        raise Stop

    monkeypatch.setattr(damage_module, "load_or_measure_damage", capture)
    text = _text(tmp_path / "data.txt", seed=0)
    args = build_parser().parse_args(["solve", "mixtral-s", "--target", "3", "--widths", "2,4", "--metric", "output",
                                      "--group-size", "64", "--asym", "--calib", text, "--calib-windows", "3",
                                      "--calib-len", "16", "--seed", "2", "--damage-cache", str(tmp_path / "d.npz"),
                                      "--act-order", "--refine", "3"])
    with pytest.raises(Stop):
        args.func(args)
    assert seen["config"] == DamageConfig(split=text, windows=3, seq_len=16, seed=2, group_size=64, symmetric=False,
                                          metric="output", act_order="desc", refine=3)
    assert seen["widths"] == (2, 4) and seen["cache"] == tmp_path / "d.npz"


def test_sweep_statistics_and_quantizer_reach_the_damage_and_statistics_settings():
    from quantmoe.bench.shared import ModelContext
    from quantmoe.bench.sweep import sweep_from_dict

    sweep = sweep_from_dict({"models": ["mixtral-s"], "runs": [{"name": "s", "solver": {"target_bits": 3}}],
                             "quantizer": {"group_size": 32, "symmetric": False, "act_order": "gar", "refine": 2},
                             "statistics": {"split": "validation", "rank_split": "test", "windows": 5, "seq_len": 64,
                                            "seed": 4, "massive_threshold": 50.0, "damage_windows": 6,
                                            "damage_metric": "output"}})
    ctx = ModelContext(spec=sweep.models[0], sweep=sweep, cache_dir=None, model=None, tokenizer=None, anatomy=None,
                       sha256="0" * 64)
    assert ctx.damage_config() == DamageConfig(split="validation", windows=6, seq_len=64, seed=4, group_size=32,
                                               symmetric=False, metric="output", act_order="gar", refine=2)
    assert ctx.statistics_config() == StatisticsConfig(split="validation", rank_split="test", windows=5, seq_len=64,
                                                       seed=4, massive_threshold=50.0)


def test_damage_cache_keys_menus_by_choice(tiny, tmp_path, monkeypatch):
    model, tok, anatomy = tiny
    calls = _counting(monkeypatch, damage_module, "measure_damage")
    config = DamageConfig(windows=2, seq_len=16, group_size=16, metric="output")
    path = tmp_path / "damage.npz"
    menu = (QuantSpec(2, 16), QuantSpec(3, None, clip="mse"), QuantSpec(4, 16, False))

    def table(menu):
        return load_or_measure_damage(model, tok, anatomy, (), config, path, menu=menu)

    first = table(menu)
    assert first.specs == menu and len(calls) == 1
    assert table(menu[:2]).specs == menu and len(calls) == 1  # a subset of the measured choices: hit
    table((QuantSpec(3, None),))  # same width, other clip: measured again
    assert len(calls) == 2
    table((QuantSpec(3, None, clip="mse"), QuantSpec(4, 16)))  # same width and group, other grid
    assert len(calls) == 3


def test_gptq_settings_added_later_keep_earlier_damage_keys():
    """A table measured before `act_order` and `refine` existed keeps its key and cache file name."""
    config = DamageConfig(windows=2, seq_len=16)
    assert "act_order" not in config.identity() and "refine" not in config.identity()
    assert config.identity() == {k: v for k, v in dataclasses.asdict(config).items() if k not in ("act_order", "refine")}
    assert DamageConfig(refine=2).measure_settings()["refine"] == 2
    assert DamageConfig(act_order=True).measure_settings()["act_order"] == "desc"


def test_refined_gptq_lowers_the_measured_output_damage(tiny):
    from quantmoe.alloc.damage import measure_damage

    model, tok, anatomy = tiny
    windows = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = measure_damage(model, anatomy, windows, (2, 3), group_size=16, metric="output")
    refined = measure_damage(model, anatomy, windows, (2, 3), group_size=16, metric="output", refine=3)
    assert refined.damage.sum() < 0.95 * plain.damage.sum()
