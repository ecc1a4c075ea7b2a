"""Perplexity and KL divergence to a full-precision reference, per token.

KL follows llama.cpp's KL statistics: for every predicted token,
KL(P_ref || P_q) = sum_v p_ref(v) * (log p_ref(v) - log p_q(v)), reported as mean,
median and high percentiles, plus top-1 agreement (argmax of both models equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p90: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return dict(self.__dict__)


def make_windows(token_ids: np.ndarray | torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows (n, seq_len) of a token stream; the tail that does not fill one is dropped."""
    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}: lower `seq_len`")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batch_logprobs(model: torch.nn.Module, batch: torch.Tensor, device: torch.device | None = None,
              **kwargs) -> torch.Tensor:
    """Log-probabilities (float32) of the next token at every position but the last: (b, t-1, vocab)."""
    device = device if device is not None else _device_of(model)
    logits = model(input_ids=batch.to(device), **kwargs).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
                       dtype: torch.dtype = torch.float32, progress: bool = False) -> list[torch.Tensor]:
    """Log-probabilities of the full-precision model, per batch, kept on the CPU.

    Computed once and reused for every quantized variant of the same model. Keep float32
    for small KL values: half-precision rounding of log-probabilities is of the order of
    the KL of an 8-bit model.
    """
    model.eval()
    starts = range(0, len(windows), batch_size)
    return [batch_logprobs(model, windows[i:i + batch_size]).to("cpu", dtype)
            for i in tqdm(starts, desc="reference log-probs", unit="batch", disable=not progress, leave=False)]


Reference = torch.nn.Module | Sequence[torch.Tensor]  # a model, or log-probs per batch


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) over the last axis from log-probabilities: sum_v p_ref(v) (log p_ref(v) - log p(v)).

    Example (p = [1/2, 1/2], q = [9/10, 1/10]: KL(p || q) = ln(5/3)):
        >>> import math
        >>> p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.9, 0.1]).log()
        >>> round(kl_divergence(p, q).item(), 6), round(math.log(5 / 3), 6)
        (0.510826, 0.510826)
    """
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)


class Tally:
    """Running sums of ``evaluate``, fed one batch at a time (shared with block-sequential evaluation)."""

    def __init__(self) -> None:
        self.nll_sum, self.count, self.agree = 0.0, 0, 0
        self.kls: list[torch.Tensor] = []

    def add(self, batch: torch.Tensor, lp: torch.Tensor, ref: torch.Tensor | None = None) -> None:
        """``batch`` (b, t) token ids, ``lp`` their log-probs (b, t-1, vocab), ``ref`` the reference's."""
        target = batch[:, 1:].to(lp.device)
        self.nll_sum += -lp.gather(-1, target.unsqueeze(-1)).sum().item()
        self.count += target.numel()
        if ref is not None:
            ref = ref.to(lp.device, torch.float32)
            if ref.shape != lp.shape:
                raise ValueError(f"reference log-probs of shape {tuple(ref.shape)} for a batch of shape "
                                 f"{tuple(lp.shape)}: compute the reference on the same windows and batch size")
            self.kls.append(kl_divergence(ref, lp).reshape(-1).cpu())
            self.agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()

    def result(self) -> EvalResult:
        nll = self.nll_sum / self.count
        result = dict(ppl=float(np.exp(nll)), nll=nll, tokens=self.count)
        if self.kls:
            kl = torch.cat(self.kls).double().clamp(min=0)
            q = torch.quantile(kl, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
            result.update(kl_mean=kl.mean().item(), kl_median=q[0].item(), kl_p90=q[1].item(),
                          kl_p99=q[2].item(), kl_max=kl.max().item(), top1_agreement=self.agree / self.count)
        return EvalResult(**result)


def check_reference(reference: Sequence[torch.Tensor], windows: torch.Tensor, batch_size: int) -> None:
    """Reference log-probs given per batch must be as many batches as ``windows`` makes."""
    batches = -(-len(windows) // batch_size)
    if len(reference) != batches:
        raise ValueError(f"the reference has {len(reference)} batches, the {len(windows)} windows make {batches} of "
                         f"{batch_size}: compute the reference on the same windows and batch size")


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, reference: Reference | None = None,
             batch_size: int = 8, progress: bool = False, desc: str = "eval") -> EvalResult:
    """Perplexity of ``model`` on ``windows``; with ``reference`` (a model, or its
    ``reference_logprobs`` for the same windows and batch size), also KL(ref || model) per token."""
    was_training = model.training
    model.eval()
    if isinstance(reference, torch.nn.Module):
        reference.eval()
    elif reference is not None:
        check_reference(reference, windows, batch_size)
    tally = Tally()
    starts = range(0, len(windows), batch_size)
    for n, i in enumerate(tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False)):
        batch = windows[i:i + batch_size]
        lp = batch_logprobs(model, batch)  # (b, t-1, vocab)
        ref = None
        if isinstance(reference, torch.nn.Module):
            ref = batch_logprobs(reference, batch)
        elif reference is not None:
            ref = reference[n]
        tally.add(batch, lp, ref)
    model.train(was_training)
    return tally.result()
