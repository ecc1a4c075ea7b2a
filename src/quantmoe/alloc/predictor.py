"""Block-importance predictor: which MoE blocks change the hidden state most.

For every MoE block b, a small MLP f_b: hidden -> width (no bias) -> ReLU -> 1 -> tanh is trained
with MSE to predict, from a token's hidden state x entering the block, the cosine similarity
cos(x, y) between x and the block's output y (the paper's predictor; its variant around the MoE
sublayer alone is not implemented). Trained on one text split, the blocks are ranked on another
by the mean predicted similarity: the lowest similarity (the block changes the state most) is the
most important block. The measured similarity on the ranking split is the oracle; the Spearman
rank correlation between predicted and measured means says how far the predictor can be trusted.

Inputs are standardized per feature with the training tokens' mean and std (a fixed first
step of the predictor, not trained). The paper does not say it does this; without it the
residual stream's large activations (|h| in the hundreds on mixtral-s) saturate the tanh, and
the predictor outputs 1.0 for every token of every block but the first, ranking nothing.

Training: AdamW (weight decay 0.01, as the paper), mini-batches, early stopping on a held-out
share of the training tokens (best weights kept), all seeded. The paper used lr 1e-4 on a large
corpus; our splits are small, and at 1e-4 the predictor is still far from converged when the
epoch budget runs out, so the default is 1e-3. Width defaults to min(1024, 4 * hidden): 1024 is
the paper's for hidden 4096 (Mixtral) and 2048 (DeepSeek).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quantmoe.anatomy import ModelAnatomy
from quantmoe.atomic import atomic_write_text
from quantmoe.calib.data import run_windows
from quantmoe.hooks import removed_after

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictorConfig:
    width: int | None = None  # None: min(1024, 4 * hidden)
    lr: float = 1e-3  # paper: 1e-4 (see the module docstring)
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 5  # epochs without a better held-out MSE before stopping
    holdout: float = 0.1  # share of the training tokens held out for early stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width is not None and self.width < 1:
            raise ValueError("check `width` of the predictor: a positive integer, or None for min(1024, 4 * hidden)")
        if not 0 < self.holdout < 1:
            raise ValueError(f"check `holdout` of the predictor: {self.holdout} is not in (0, 1)")
        for key in ("batch_size", "max_epochs", "patience"):
            if getattr(self, key) < 1:
                raise ValueError(f"check `{key}` of the predictor: it must be a positive integer")
        if self.lr <= 0:
            raise ValueError(f"check `lr` of the predictor: {self.lr} must be positive")


@dataclass(frozen=True)
class BlockImportance:
    """Predicted and measured (oracle) mean similarity of every MoE block on the ranking split."""

    predicted: Mapping[int, float]  # block -> mean predicted cos(x, y)
    measured: Mapping[int, float]  # block -> mean measured cos(x, y)
    spearman: float  # rank correlation of predicted vs measured over blocks (nan if undefined)
    val_mse: Mapping[int, float]  # block -> best held-out MSE
    epochs: Mapping[int, int]  # block -> epochs trained

    def ranking(self, source: str = "predicted") -> tuple[int, ...]:
        """MoE blocks, most important (lowest similarity) first; ties keep block order."""
        sims = self.predicted if source == "predicted" else self.measured
        return tuple(sorted(sims, key=lambda b: (sims[b], b)))

    def to_json(self) -> str:
        return json.dumps({"predicted": self.predicted, "measured": self.measured, "spearman": self.spearman,
                           "val_mse": self.val_mse, "epochs": self.epochs})

    @classmethod
    def from_json(cls, text: str) -> BlockImportance:
        d = json.loads(text)
        ints = {k: {int(b): v for b, v in d[k].items()} for k in ("predicted", "measured", "val_mse", "epochs")}
        return cls(spearman=d["spearman"], **ints)

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())


class Standardize(nn.Module):
    """(x - mean) / std per feature, with fixed statistics of the training tokens."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_predictor(hidden: int, width: int, mean: torch.Tensor | None = None,
                   std: torch.Tensor | None = None) -> nn.Sequential:
    """Standardize -> Linear(hidden, width, no bias) -> ReLU -> Linear(width, 1) -> tanh."""
    mean = torch.zeros(hidden) if mean is None else mean
    std = torch.ones(hidden) if std is None else std
    return nn.Sequential(Standardize(mean, std), nn.Linear(hidden, width, bias=False), nn.ReLU(),
                         nn.Linear(width, 1), nn.Tanh())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def block_similarity(model: nn.Module, anatomy: ModelAnatomy, windows: torch.Tensor,
                     batch_size: int = 8) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE block: the hidden states entering it X (tokens, hidden) and cos(x, y) (tokens,), on the CPU."""
    blocks = [b for b in anatomy.blocks if b.is_moe]
    xs: dict[int, list[torch.Tensor]] = {b.index: [] for b in blocks}
    cos: dict[int, list[torch.Tensor]] = {b.index: [] for b in blocks}

    def hook_for(index: int):
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            x, y = x.detach().reshape(-1, x.shape[-1]).float(), y.detach().reshape(-1, y.shape[-1]).float()
            xs[index].append(x.cpu())
            cos[index].append(nn.functional.cosine_similarity(x, y, dim=-1).cpu())
        return hook

    with removed_after() as handles:
        for b in blocks:
            handles.append(model.get_submodule(b.module_name).register_forward_hook(hook_for(b.index),
                                                                                   with_kwargs=True))
        run_windows(model, windows, batch_size)
    return {b: (torch.cat(xs[b]), torch.cat(cos[b])) for b in xs}


def train_predictor(X: torch.Tensor, y: torch.Tensor, config: PredictorConfig = PredictorConfig()
                    ) -> tuple[nn.Sequential, float, int]:
    """Fit f(X) ~ y by MSE with early stopping; returns (best model, best held-out MSE, epochs run).

    X (tokens, hidden), y (tokens,). Deterministic for a given seed (and thread count).
    """
    n, hidden = X.shape
    if n < 2:
        raise ValueError(f"the predictor needs at least 2 training tokens, got {n}: give more calibration windows")
    gen = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, int(round(config.holdout * n)))
    val, train = perm[:n_val], perm[n_val:]
    mean, std = X[train].mean(dim=0), X[train].std(dim=0, correction=0).clamp_min(1e-6)  # (hidden,)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = make_predictor(hidden, config.width or min(1024, 4 * hidden), mean, std)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, stale, epoch = math.inf, None, 0, 0
    for epoch in range(1, config.max_epochs + 1):  # noqa: B007 (returned: the epochs run)
        net.train()
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            loss = nn.functional.mse_loss(net(X[idx]).squeeze(-1), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val_mse = float(nn.functional.mse_loss(net(X[val]).squeeze(-1), y[val]))
        if val_mse < best:
            best, stale = val_mse, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return net, best, epoch


def block_importance(model: nn.Module, anatomy: ModelAnatomy, train_windows: torch.Tensor,
                     rank_windows: torch.Tensor, config: PredictorConfig = PredictorConfig(),
                     batch_size: int = 8) -> BlockImportance:
    """Train one predictor per MoE block on `train_windows`, rank the blocks on `rank_windows`."""
    train = block_similarity(model, anatomy, train_windows, batch_size)
    rank = block_similarity(model, anatomy, rank_windows, batch_size)
    predicted, measured, val_mse, epochs = {}, {}, {}, {}
    for b, (X, y) in train.items():
        net, val_mse[b], epochs[b] = train_predictor(X, y, config)
        with torch.no_grad():
            predicted[b] = float(net(rank[b][0]).mean())
        measured[b] = float(rank[b][1].mean())
        log.info("block %d: held-out MSE %.5f after %d epochs; similarity predicted %.4f, measured %.4f",
                 b, val_mse[b], epochs[b], predicted[b], measured[b])
    blocks = sorted(predicted)
    rho = spearman(np.array([predicted[b] for b in blocks]), np.array([measured[b] for b in blocks]))
    return BlockImportance(predicted, measured, rho, val_mse, epochs)
