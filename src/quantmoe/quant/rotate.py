"""An orthogonal rotation of the residual stream, folded into the weights (QuaRot / SpinQuant style).

For a pre-norm model with RMSNorm, RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q once the
norm's scale g is 1 (its scale folded into the linears that read it: W <- W diag(g)). So with

    E <- E Q                      embeddings (V, H)
    W <- W Q                      every linear reading the residual (out, H): attention inputs,
                                  router, experts' / shared experts' / dense MLP's gate and up, lm_head
    W <- Qᵀ W,  b <- Qᵀ b         every linear writing the residual (H, in): o_proj, every down_proj

the residual stream of the rotated model is the original one times Q, and the logits are
unchanged (up to rounding). Nothing changes at run time: the rotated model is the same
architecture with other weights, so checkpoints and GPTQ exports load everywhere. What
changes is what GPTQ sees: rotated weights and activations have fewer outliers per group.

Q = D (H_{2^k} / sqrt(2^k)) ⊗ R_m for a hidden size H = 2^k m (m odd): a normalized Sylvester
Hadamard matrix of the largest power-of-two factor, a Haar-random orthogonal matrix R_m
(QR of a Gaussian, signs fixed) for the odd rest, and random signs D. With H a power of two
it is the randomized Hadamard transform of QuaRot. Computed in float64, applied in float64,
stored in the weights' dtype.

Norms inside attention (DeepSeek's q_a_layernorm / kv_a_layernorm, q/k norms) act on other
spaces and are left alone. Refused (ValueError naming the family and why): tied embeddings,
hybrid token mixers, norms other than a plain RMSNorm, and blocks with residual norms other
than `input_layernorm` / `post_attention_layernorm`.

Example:
    >>> from quantmoe.anatomy import tiny_model
    >>> model = tiny_model("mixtral")
    >>> Q = rotate_model(model, seed=0)
    >>> bool(torch.allclose(Q.T @ Q, torch.eye(32, dtype=torch.float64)))
    True
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn

from quantmoe.anatomy import ModelAnatomy, describe, family_of, fuse_experts, is_unfused, unfuse_experts
from quantmoe.anatomy.specs import FamilySpec

log = logging.getLogger(__name__)

# attention linears by what they do to the residual stream; any other kind is refused
ATTENTION_READS = frozenset({"q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa", "gate_proj"})
ATTENTION_INNER = frozenset({"q_b_proj", "kv_b_proj"})  # read the low-rank latents, not the residual
ATTENTION_WRITES = frozenset({"o_proj"})
BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP
FINAL_NORM = "norm"  # on the blocks' parent (model.model.norm)


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order n (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester Hadamard matrices have power-of-two orders, not {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix, float64: QR of a Gaussian with R's diagonal made positive."""
    A = torch.randn(n, n, dtype=torch.float64, generator=generator)
    Q, R = torch.linalg.qr(A)
    signs = torch.sign(torch.diagonal(R)).where(torch.diagonal(R) != 0, torch.ones((), dtype=torch.float64))
    return (Q * signs[None, :]).contiguous()


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Q = D (H_{2^k}/sqrt(2^k)) ⊗ R_m for n = 2^k m, m odd: orthogonal (n, n), float64.

    D is random signs, R_m Haar-random orthogonal (the identity when m = 1).
    """
    g = torch.Generator().manual_seed(seed)
    two = n & -n  # largest power-of-two factor
    odd = n // two
    R = random_orthogonal(odd, g) if odd > 1 else torch.ones(1, 1, dtype=torch.float64)
    signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(hadamard(two) / math.sqrt(two), R)


def _refuse(spec: FamilySpec, reason: str) -> ValueError:
    return ValueError(f"--rotate does not apply to {spec.model_type} ({spec.display_name}): {reason}")


def _check_norm(norm: nn.Module, name: str, spec: FamilySpec, Q: torch.Tensor) -> None:
    """``norm`` is x -> g * n(x) with n rotation-invariant (a plain RMSNorm), probed on a float32 copy."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (Q.shape[0],) or getattr(norm, "bias", None) is not None:
        raise _refuse(spec, f"{name} ({type(norm).__name__}) is not an RMSNorm with one scale per channel and no "
                            "bias")
    probe = copy.deepcopy(norm).float()
    x = torch.randn(4, Q.shape[0], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = probe(x)
        probe.weight.fill_(1.0)
        unit = probe(x)
        Qf = Q.float()
        ok = torch.allclose(y, weight.float() * unit, atol=1e-5, rtol=1e-4) and \
            torch.allclose(probe(x @ Qf), unit @ Qf, atol=1e-4, rtol=1e-4)
    if not ok:
        raise _refuse(spec, f"{name} ({type(norm).__name__}) is not weight * x / rms(x) (a LayerNorm, a "
                            "(1 + weight) scale, or a norm that is not rotation-invariant)")


def _weight(module: nn.Module, name: str, spec: FamilySpec) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise _refuse(spec, f"{name} ({type(module).__name__}) has no (out, in) weight to rotate")
    return weight


@torch.no_grad()
def _reads(module: nn.Module, name: str, spec: FamilySpec, Q: torch.Tensor, g: torch.Tensor | None) -> None:
    """W <- W diag(g) Q for a module reading the residual (after the norm of scale g)."""
    W = _weight(module, name, spec)  # (out, H)
    if W.shape[1] != Q.shape[0]:
        raise _refuse(spec, f"{name} reads {W.shape[1]} features, not the hidden size {Q.shape[0]}")
    Wd = W.to(torch.float64)
    if g is not None:
        Wd = Wd * g[None, :]
    W.copy_((Wd @ Q).to(W.dtype))


@torch.no_grad()
def _writes(module: nn.Module, name: str, spec: FamilySpec, Q: torch.Tensor) -> None:
    """W <- Qᵀ W (and b <- Qᵀ b) for a module adding to the residual."""
    W = _weight(module, name, spec)  # (H, in)
    if W.shape[0] != Q.shape[0]:
        raise _refuse(spec, f"{name} writes {W.shape[0]} features, not the hidden size {Q.shape[0]}")
    W.copy_((Q.T @ W.to(torch.float64)).to(W.dtype))
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((Q.T @ bias.to(torch.float64)).to(bias.dtype))


def check_rotatable(model: nn.Module) -> FamilySpec:
    """The model's FamilySpec, or a ValueError naming the family and why it cannot be rotated."""
    spec = family_of(model)
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    if spec.mixers:
        raise _refuse(spec, "its hybrid token mixers (" + ", ".join(m.label for m in spec.mixers) +
                      ") are not covered by the rotation")
    if getattr(text, "tie_word_embeddings", False):
        raise _refuse(spec, "its embeddings are tied to lm_head, which reads the final norm's output; folding that "
                            "norm into lm_head would change the embeddings too")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("--rotate needs every weight in memory (not a streamed skeleton): drop --stream/--resume")
    for i, block in enumerate(model.get_submodule(spec.layers)):
        for child_name, child in block.named_children():
            looks_like_norm = "norm" in child_name.lower() or "norm" in type(child).__name__.lower()
            if looks_like_norm and child_name not in BLOCK_NORMS:
                raise _refuse(spec, f"block {i} has the norm `{child_name}` on its residual path besides "
                                    f"{' and '.join(BLOCK_NORMS)}")
        for norm_name in BLOCK_NORMS:
            if not isinstance(getattr(block, norm_name, None), nn.Module):  # what it is: probed by _check_norm
                raise _refuse(spec, f"block {i} has no `{norm_name}` pre-norm")
    return spec


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Rotate the residual stream of ``model`` in place by a random Hadamard Q; returns Q (H, H), float64.

    First every pre-norm's scale g is folded into the linears reading its output (and set to 1),
    then embeddings become E Q, residual readers W Q, residual writers Qᵀ W. The model's
    outputs do not change beyond rounding. The experts stay in the view they were in (fused
    or per-expert).
    """
    spec = check_rotatable(model)
    anatomy = describe(model)
    hidden = model.get_submodule(spec.embedding).weight.shape[1]
    Q = random_hadamard(hidden, seed)
    layers_parent = spec.layers.rsplit(".", 1)[0]
    final_norm_name = f"{layers_parent}.{FINAL_NORM}"
    try:
        final_norm = model.get_submodule(final_norm_name)
    except AttributeError:
        raise _refuse(spec, f"it has no final norm `{final_norm_name}`") from None
    norms = [(f"{spec.layers}.{b.index}.{n}", model.get_submodule(f"{spec.layers}.{b.index}.{n}"))
             for b in anatomy.blocks for n in BLOCK_NORMS] + [(final_norm_name, final_norm)]
    for name, norm in norms:
        _check_norm(norm, name, spec, Q)
    for b in anatomy.blocks:
        for u in b.attention:
            kind = u.rsplit(".", 1)[1]
            if kind not in ATTENTION_READS | ATTENTION_INNER | ATTENTION_WRITES:
                raise _refuse(spec, f"its attention linear {u} is not one whose place on the residual is known")
    was_fused = not is_unfused(model)
    unfuse_experts(model)
    try:
        _check_covered(model, spec, anatomy, hidden, final_norm_name)
        _rotate(model, spec, anatomy, Q, final_norm_name)
    finally:
        if was_fused:
            fuse_experts(model)
    log.info("rotated the residual stream of %s (hidden %d) by a random Hadamard matrix, seed %d",
             spec.model_type, hidden, seed)
    return Q


def _check_covered(model: nn.Module, spec: FamilySpec, anatomy: ModelAnatomy, hidden: int, final_norm_name: str) -> None:
    """Every parameter with a hidden-size axis belongs to a module the rotation handles.

    Vectors inside the attention (q/k norms) act on its projections' outputs and are skipped.
    A linear, norm or projection the family spec does not declare (a sparse-attention indexer,
    an output gate beside the attention, a norm after the MoE) would see the rotated residual
    unrotated: refused with its name. Run on the per-expert view.
    """
    handled = {spec.embedding, spec.lm_head, final_norm_name, *(u.name for u in anatomy.units)}
    attention = tuple(f"{b.module_name}.{b.mixer}." for b in anatomy.blocks)
    for b in anatomy.blocks:
        handled |= {f"{b.module_name}.{n}" for n in BLOCK_NORMS}
        handled |= {n for n in (b.router, b.shared_gate) if n is not None}
    for name, module in model.named_modules():
        if name in handled or any(name.startswith(h + ".") for h in handled):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() == 1 and f"{name}.".startswith(attention):
                continue  # q/k norms: on projection outputs (heads x head_dim may equal the hidden size)
            if hidden in p.shape:
                raise _refuse(spec, f"{name}.{pname} {tuple(p.shape)} touches the residual stream but is not "
                                    "one of the attention, router, expert, MLP or norm modules the rotation "
                                    "handles")


def _rotate(model: nn.Module, spec: FamilySpec, anatomy: ModelAnatomy, Q: torch.Tensor, final_norm_name: str) -> None:
    def norm_scale(name: str) -> torch.Tensor:
        norm = model.get_submodule(name)
        g = norm.weight.to(torch.float64).clone()
        norm.weight.fill_(1.0)
        return g

    embedding = model.get_submodule(spec.embedding).weight  # (V, H)
    embedding.copy_((embedding.to(torch.float64) @ Q).to(embedding.dtype))
    for b in anatomy.blocks:
        g_attn = norm_scale(f"{b.module_name}.{BLOCK_NORMS[0]}")
        g_mlp = norm_scale(f"{b.module_name}.{BLOCK_NORMS[1]}")
        for u in b.attention:
            kind = u.rsplit(".", 1)[1]
            if kind in ATTENTION_READS:
                _reads(model.get_submodule(u), u, spec, Q, g_attn)
            elif kind in ATTENTION_WRITES:
                _writes(model.get_submodule(u), u, spec, Q)
        mlp_reads = [ex[0] for ex in b.experts] + [ex[1] for ex in b.experts]
        mlp_reads += list(b.shared[:-1]) + list(b.dense_mlp[:-1])
        mlp_reads += [n for n in (b.router, b.shared_gate) if n is not None]
        for name in mlp_reads:
            _reads(model.get_submodule(name), name, spec, Q, g_mlp)
        for name in [ex[2] for ex in b.experts] + list(b.shared[-1:]) + list(b.dense_mlp[-1:]):
            _writes(model.get_submodule(name), name, spec, Q)
    _reads(model.get_submodule(spec.lm_head), spec.lm_head, spec, Q, norm_scale(final_norm_name))
