"""Expert-parallel quantization over torch.distributed ranks (torchrun: gloo on CPU, NCCL on GPUs).

Every rank holds the whole model and runs the sequential driver (pipeline.py) on a contiguous
share of the calibration windows (data parallel). Per block and stage:

- each rank sums x x^T of the stage's inputs over its windows (calib/hessian.py);
- ``reduce_stats`` sends each input's sums to the rank that owns it, with the global token
  counts, so the owner's H = 2/n sum x x^T uses the global n exactly as one process would:
  routed expert e belongs to rank e % world, every other linear (attention, shared experts,
  dense MLPs) to rank 0; an input that several experts read (the ``all`` MoE mode) is
  all-reduced;
- each rank quantizes the linears it owns (GPTQ batched over its experts; the RTN fallback
  of an expert with too few tokens decided on the global count);
- ``share_stage`` broadcasts each owner's codes, zero points and scales (and gathers the
  unit reports), so every rank holds the same quantized block before it runs the block over
  its windows for the next block's inputs.

The result equals the single-process run up to the floating-point order of the Hessian sums
(tested in tests/quant/test_distributed.py). The collectives time out after the process
group's ``timeout``: a rank that died or hangs fails the job with ``RankFailure``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from quantmoe.anatomy import LinearUnit
from quantmoe.calib.hessian import HessianCollector, InputStats
from quantmoe.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # a rank waits this long for the slowest owner's GPTQ of one stage


class RankFailure(RuntimeError):
    """A collective failed: another rank died, or did not reach it within the timeout."""


@dataclass(frozen=True)
class Parallel:
    """This process's place among the ranks of one quantization."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration windows (sizes differ by at most one)."""
        n = len(windows)
        if n < self.world:
            raise ValueError(f"check `num_windows`: {n} calibration windows cannot be shared by {self.world} ranks")
        return windows[self.rank * n // self.world:(self.rank + 1) * n // self.world]

    def owner(self, unit: LinearUnit) -> int:
        """Round-robin by expert index; every linear that is not a routed expert's belongs to rank 0."""
        return 0 if unit.expert is None else unit.expert % self.world

    def owns(self, unit: LinearUnit) -> bool:
        return self.owner(unit) == self.rank

    # -- collectives ----------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:  # DistBackendError and gloo/NCCL errors are RuntimeErrors
            raise RankFailure(f"rank {self.rank} of {self.world}: {what} failed: another rank died or did not "
                              f"reach it within the process group's timeout ({err.__class__.__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err

    def all_reduce(self, t: torch.Tensor, what: str) -> None:
        self._call(what, dist.all_reduce, t)

    def reduce_stats(self, collector: HessianCollector, units: Sequence[LinearUnit], what: str) -> None:
        """Sum every input's x x^T, weight sum and token count onto the rank(s) that quantize from it."""
        owner_of: dict[str, int | None] = {}
        in_features: dict[str, int] = {}
        for u in units:
            key = collector.key_of[u.name]
            owner_of.setdefault(key, self.owner(u))
            in_features[key] = u.in_features
        keys = sorted(owner_of)
        # an input read by several experts (``all`` mode: one statistic for every gate/up) goes to all ranks
        readers: dict[int, list[str]] = {}
        for key in keys:
            if key in collector.stats:
                readers.setdefault(id(collector.stats[key]), []).append(key)
        for shared in readers.values():
            if len(shared) > 1:
                for key in shared:
                    owner_of[key] = None
        device = next(collector.model.get_submodule(units[0].name).parameters()).device
        for key in keys:
            if key not in collector.stats:  # no rows on this rank's windows
                collector.stats[key] = InputStats(in_features[key], device)
        unique, seen = [], set()  # one key per statistic
        for key in keys:
            if id(collector.stats[key]) not in seen:
                seen.add(id(collector.stats[key]))
                unique.append(key)
        counts = torch.tensor([[collector.stats[k].weight_sum, collector.stats[k].tokens] for k in unique],
                              dtype=torch.float64, device=device)  # (inputs, 2)
        self.all_reduce(counts, f"{what}: token counts")
        for k, (weight_sum, tokens) in zip(unique, counts.tolist()):
            stats = collector.stats[k]
            stats.weight_sum, stats.tokens = weight_sum, int(tokens)
            if owner_of[k] is None:
                self.all_reduce(stats.xtx, f"{what}: Hessian of {k}")
            else:
                self._call(f"{what}: Hessian of {k}", dist.reduce, stats.xtx, dst=owner_of[k])
        for name, routed in collector.routed_tokens.items():
            routed_dev = routed.to(device)
            self.all_reduce(routed_dev, f"{what}: routed tokens of {name}")
            routed.copy_(routed_dev.cpu())

    def share_stage(self, model: torch.nn.Module, units: Sequence[LinearUnit], reports: MutableMapping,
                    staged: Mapping[str, QuantLinear], what: str) -> dict[str, QuantLinear]:
        """Every owner's quantized linears to every rank: returns the ones this rank did not quantize
        (their ``QuantLinear``s, bit for bit the owners'), and fills in their reports."""
        mine = {u.name: (reports[u.name], staged[u.name].bits, staged[u.name].group_size)
                for u in units if self.owns(u)}
        gathered: list[dict | None] = [None] * self.world
        self._call(f"{what}: unit reports", dist.all_gather_object, gathered, mine)
        received: dict[str, QuantLinear] = {}
        for u in units:
            src = self.owner(u)
            report, bits, group_size = gathered[src][u.name]
            if src == self.rank:
                q = staged[u.name]
            else:
                linear = model.get_submodule(u.name)
                W = linear.weight
                q = QuantLinear(W.shape[1], W.shape[0], bits, group_size, bias=linear.bias is not None,
                                dtype=W.dtype, device=W.device)
                if linear.bias is not None:
                    q.bias.copy_(linear.bias.detach())
                received[u.name] = q
                reports[u.name] = report
            for buffer in ("qweight", "qzeros", "scales"):
                self._call(f"{what}: {buffer} of {u.name}", dist.broadcast, getattr(q, buffer), src=src)
        return received


def current() -> Parallel | None:
    """The ranks of an initialized process group of more than one; None runs the single-process path."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Parallel(dist.get_rank(), dist.get_world_size())


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S, device: str | None = None) -> tuple[Parallel | None, str | None]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL when the blocks run on
    GPUs (each rank on ``cuda:LOCAL_RANK``), else gloo. Returns (ranks, device); (None, device)
    without torchrun or with one rank, which runs the single-process path unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None, device
    if timeout_s <= 0:
        raise ValueError(f"check --dist-timeout: {timeout_s} must be a positive number of seconds")
    gpu = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout_s))
    parallel = current()
    log.info("rank %d of %d (%s), calibration windows shared, experts round-robin", parallel.rank, parallel.world,
             dist.get_backend())
    return parallel, device
