"""The ``kfac`` damage against a computation by hand (autograd on the model, not the library's hooks)."""

import pytest
import torch

from quantmoe.alloc.damage import measure_damage
from quantmoe.anatomy import describe, tiny_model
from quantmoe.quant.grid import QuantSpec, rtn


@pytest.mark.parametrize("kind", ["q_proj", "o_proj"])
def test_kfac_is_the_output_gradient_weighted_output_error(kind):
    model = tiny_model("mixtral").float()
    anatomy = describe(model)
    windows = torch.randint(3, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    table = measure_damage(model, anatomy, windows, (2,), group_size=16, metric="kfac", quantizer="rtn")
    name = next(u.name for u in anatomy.units if u.block == 1 and u.kind == kind)

    linear = model.get_submodule(name)
    seen = {}

    def keep(module, args, out):
        seen["x"] = args[0].detach().reshape(-1, args[0].shape[-1])
        out.retain_grad()
        seen["y"] = out

    handle = linear.register_forward_hook(keep)
    model.get_input_embeddings().weight.requires_grad_(True)
    try:
        loss = model(input_ids=windows, labels=windows).loss * (windows.shape[0] * (windows.shape[1] - 1))
        loss.backward()
    finally:
        handle.remove()
        model.get_input_embeddings().weight.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    g = seen["y"].grad.reshape(-1, linear.weight.shape[0])  # (tokens, out)
    X = seen["x"]  # (tokens, in)
    W = linear.weight.detach()
    D = rtn(W, QuantSpec(2, 16)) - W
    per_token = X @ D.T  # (tokens, out): the output error of each token
    expected = 0.5 * float((g.pow(2).sum(0) * per_token.pow(2).mean(0)).sum())
    assert table.row(name)[0] == pytest.approx(expected, rel=1e-4)
    # and not the plain output error (the gradients weigh the outputs)
    assert table.row(name)[0] != pytest.approx(0.5 * float(per_token.pow(2).sum()), rel=1e-2)
