"""Load a GPTQ-format folder with GPTQModel (its torch kernel, on the CPU) and write what it computes.

Run INSIDE the GPTQModel venv (benches/gptqmodel_env.py); imports no quantmoe, so the check is
GPTQModel's own reading of the files:

    python tests/export/gptqmodel_client.py --job DIR ids.safetensors out.safetensors [--job ...]

Per job: ``ids.safetensors`` holds ``input_ids`` (batch, seq) int64; ``out.safetensors`` gets
``logits`` (float32 of the model run in ``--dtype``) and, per quantized module,
``weight.<name>``: the weight GPTQModel's kernel dequantizes (its own v1 -> v2 zero-point
conversion first), (out, in) float32. With ``--save-suffix``, GPTQModel also writes the model
it loaded with its own writer (a GPTQModel-written folder). One line "RESULT {json}" per job on stdout: versions, kernel
classes, the linears left unquantized, seconds. Several jobs share one import of GPTQModel.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", nargs=3, action="append", required=True, metavar=("DIR", "IDS", "OUT"))
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-suffix", default=None,
                   help="also save each loaded model with GPTQModel's own writer to DIR + this suffix")
    args = p.parse_args()

    import time

    # eager kernels: on the CPU, torch.compile of the kernel takes minutes per shape on a shared
    # machine; the arithmetic is the kernel's own either way
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    import gptqmodel
    import transformers
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    t_start = time.perf_counter()
    for folder, ids_path, out_path in args.job:
        model = GPTQModel.load(folder, backend=BACKEND.TORCH, device="cpu", dtype=getattr(torch, args.dtype))
        t_load = time.perf_counter()
        net = model.model.eval()
        ids = load_file(ids_path)["input_ids"]
        out: dict[str, torch.Tensor] = {}
        kernels: dict[str, int] = {}
        plain: list[str] = []
        with torch.no_grad():
            out["logits"] = net(input_ids=ids).logits.float().contiguous()
            t_forward = time.perf_counter()
            for name, module in net.named_modules():
                if isinstance(module, BaseQuantLinear):
                    kernels[type(module).__name__] = kernels.get(type(module).__name__, 0) + 1
                    if getattr(module, "REQUIRES_FORMAT_V2", False) and module.qzero_format() == 1:
                        convert_gptq_v1_to_v2_format_module(module, bits=module.bits, pack_dtype=module.pack_dtype)
                    out[f"weight.{name}"] = module.dequantize_weight().T.float().contiguous()  # (out, in)
                elif isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                    plain.append(name)
        save_file(out, out_path)
        if args.save_suffix:
            model.save(folder.rstrip("/") + args.save_suffix)
        seconds = {"import": round(t_start - t0, 1), "load": round(t_load - t_start, 1),
                   "forward": round(t_forward - t_load, 1), "weights": round(time.perf_counter() - t_forward, 1)}
        print("RESULT " + json.dumps({"model": folder, "gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                          "transformers": transformers.__version__, "kernels": kernels, "unquantized_linears": plain,
                          "dtype": args.dtype, "seconds": seconds}), flush=True)
        t0 = t_start = time.perf_counter()

if __name__ == "__main__":
    main()
