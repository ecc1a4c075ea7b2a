import copy
import math

import numpy as np
import pytest
import torch

from quantmoe.anatomy import tiny_model
from quantmoe.eval.metrics import evaluate, kl_divergence, make_windows, reference_logprobs


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


def test_kl_known_values_and_direction():
    """p = (1/2, 1/2), q = (9/10, 1/10): KL(p||q) = 1/2 ln(5/9) + 1/2 ln 5 = ln(5/3) = 0.5108,
    KL(q||p) = 9/10 ln(9/5) + 1/10 ln(1/5) = 0.3681: the direction shows."""
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.9, 0.1]).log()
    assert kl_divergence(p, q).item() == pytest.approx(math.log(5 / 3), rel=1e-6)
    assert kl_divergence(q, p).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-6)
    assert kl_divergence(q, p).item() == pytest.approx(0.368064, abs=1e-6)
    assert kl_divergence(p, p).item() == 0.0
    # three outcomes, batched over a leading axis: (1/4, 1/4, 1/2) against uniform is ln 3 - 3/2 ln 2
    a = torch.tensor([[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]).log()
    u = torch.full((2, 3), 1 / 3).log()
    torch.testing.assert_close(kl_divergence(a, u), torch.tensor([math.log(3) - 1.5 * math.log(2), 0.0]))


class _FixedDistribution(torch.nn.Module):
    """A 'language model' predicting the same next-token distribution everywhere."""

    def __init__(self, probs: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probs).log())  # (vocab,)

    def forward(self, input_ids: torch.Tensor, **_kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_evaluate_reports_kl_of_reference_to_model():
    """Reference P = (1/4, 3/4), model Q = (9/10, 1/10), every token 0: KL(P||Q), not KL(Q||P);
    perplexity is the model's own, exp(-ln 9/10); top-1 choices always differ."""
    ref, model = _FixedDistribution([0.25, 0.75]), _FixedDistribution([0.9, 0.1])
    windows = torch.zeros(5, 7, dtype=torch.long)
    kl_pq = 0.25 * math.log(0.25 / 0.9) + 0.75 * math.log(0.75 / 0.1)  # 1.1909
    kl_qp = 0.9 * math.log(0.9 / 0.25) + 0.1 * math.log(0.1 / 0.75)  # 0.9514
    for reference in (ref, reference_logprobs(ref, windows, batch_size=2)):
        res = evaluate(model, windows, reference=reference, batch_size=2)
        assert res.kl_mean == pytest.approx(kl_pq, rel=1e-5) and abs(res.kl_mean - kl_qp) > 0.2
        assert res.kl_max == pytest.approx(kl_pq, rel=1e-5) and res.kl_median == pytest.approx(kl_pq, rel=1e-5)
        assert res.top1_agreement == 0.0
        assert res.tokens == 5 * 6 and res.ppl == pytest.approx(1 / 0.9, rel=1e-6)
