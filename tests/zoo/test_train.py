import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import quantmoe.zoo.train as train_mod
from quantmoe.data import split_path
from quantmoe.models import embedded_root
from quantmoe.zoo.recipes import RECIPES

TINY = replace(RECIPES["mixtral-s"], name="tiny", steps=4, eval_every=2, batch_size=2, seq_len=32,
               config={**RECIPES["mixtral-s"].config, "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1})


def _train(tmp_path, sub):
    return train_mod.train_model(TINY, embedded_root() / "tokenizer", split_path("calibration"),
                                 split_path("validation"), tmp_path / sub / "model", tmp_path / sub / "work",
                                 threads=1)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    full = _train(tmp_path, "a")
    real_lr = train_mod._lr_at

    def crash_at_step_3(step, recipe):
        if step == 2:
            raise KeyboardInterrupt
        return real_lr(step, recipe)

    monkeypatch.setattr(train_mod, "_lr_at", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "b")
    assert not (tmp_path / "b" / "model").exists()  # nothing half-written
    monkeypatch.setattr(train_mod, "_lr_at", real_lr)
    resumed = _train(tmp_path, "b")
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in full["history"]])
    a = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "b" / "model" / "training.json").read_text())
    assert card["recipe"]["steps"] == 4 and len(card["history"]) == 4
