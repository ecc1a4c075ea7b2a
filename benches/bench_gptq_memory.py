"""Peak memory of one GPTQ call, in float32 copies of its weight and Hessian.

`--max-memory`'s estimate and `--expert-batch-mb`'s chunking count a GPTQ call's working set
as ``GPTQ_W_COPIES`` float32 copies of W (out, in) and ``GPTQ_H_COPIES`` of H (in, in) per
linear (`quant/working_set.py`, `gptq_working_set`). This prints what a call really adds to the
process's peak RSS, for a dense linear (`gptq_quantize`) and a batch of experts
(`gptq_quantize_batched`), each measured in a fresh process (Linux's ``clear_refs`` resets the
high-water mark before the call):

    .venv/bin/python benches/bench_gptq_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, torch
from quantmoe.quant.gptq import gptq_quantize, gptq_quantize_batched
from quantmoe.quant.grid import QuantSpec

def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

out, n, experts = (int(a) for a in sys.argv[1:4])
gen = torch.Generator().manual_seed(0)
W = torch.randn(experts, out, n, generator=gen).bfloat16()  # (E, out, in)
X = torch.randn(experts, 2 * n, n, generator=gen)
H = X.transpose(1, 2) @ X  # (E, in, in) positive definite
del X
spec = QuantSpec(bits=4, group_size=128)
open("/proc/self/clear_refs", "w").write("5")
base = high_water()
if experts == 1:
    gptq_quantize(W[0], H[0], spec)
else:
    gptq_quantize_batched(W, H, spec)
print(json.dumps({"added": high_water() - base}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1024x2048x1,2048x1024x1,1024x4096x1,4096x1024x1,512x1024x8,1024x512x16,256x2048x8",
                    help="OUTxINxEXPERTS, comma-separated (1 expert: a dense gptq_quantize call)")
    args = ap.parse_args()
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    from quantmoe.quant.working_set import gptq_working_set

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    print(f"{'out x in x experts':>20} {'added MB':>9} {'estimated MB':>13} {'added / estimated':>18}")
    for shape in args.shapes.split(","):
        out, n, experts = shape.split("x")
        done = subprocess.run([sys.executable, "-c", CHILD, out, n, experts], capture_output=True, text=True,
                              env=env, check=True)
        got = json.loads(done.stdout.strip().splitlines()[-1])
        estimate = int(experts) * gptq_working_set((int(out), int(n)))
        print(f"{shape:>20} {got['added'] / 2**20:9.0f} {estimate / 2**20:13.0f} {got['added'] / estimate:18.2f}")


if __name__ == "__main__":
    main()
