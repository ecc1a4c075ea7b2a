import copy
import math

import numpy as np
import pytest
import torch

from quantmoe.anatomy import tiny_model
from quantmoe.eval.metrics import evaluate, make_windows, reference_logprobs


@pytest.fixture(scope="module")
def model_and_windows():
    model = tiny_model("mixtral")
    gen = np.random.default_rng(0)
    ids = gen.integers(0, model.config.vocab_size, size=16 * 10 + 5)
    return model, make_windows(ids, 16)


def test_windows_are_non_overlapping_and_drop_the_tail():
    w = make_windows(np.arange(50), 16)
    assert w.shape == (3, 16)
    assert w[1, 0].item() == 16
    with pytest.raises(ValueError, match="seq_len"):
        make_windows(np.arange(5), 16)


def test_perplexity_matches_manual_cross_entropy(model_and_windows):
    model, windows = model_and_windows
    res = evaluate(model, windows, batch_size=3)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert res.tokens == windows[:, 1:].numel()
    assert res.ppl == pytest.approx(math.exp(ce.item()), rel=1e-5)
    assert res.kl_mean is None


def test_kl_to_itself_is_zero_and_positive_for_a_perturbed_model(model_and_windows):
    model, windows = model_and_windows
    same = evaluate(model, windows, reference=model)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = evaluate(noisy, windows, reference=model)
    assert res.kl_mean > 1e-4
    assert res.kl_median <= res.kl_p90 <= res.kl_p99 <= res.kl_max
    assert res.top1_agreement < 1.0
    # cached reference log-probs give the same numbers as the reference model
    cached = evaluate(noisy, windows, reference=reference_logprobs(model, windows))
    assert cached.kl_mean == pytest.approx(res.kl_mean, rel=1e-6)
    assert cached.top1_agreement == res.top1_agreement
