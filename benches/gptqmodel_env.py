"""A separate venv with GPTQModel 7.7.0 on the CPU build of torch, for the peer benchmark.

GPTQModel's metadata pins torch>=2.14.1; it imports and quantizes on the CPU with the
torch 2.13.0 CPU wheel on local disk, so torch is installed first (pinned by a constraint
file on every pip call, so pip never pulls a CUDA build) and GPTQModel with --no-deps, then
the packages it needs to import and quantize on the CPU (found by importing it and running
a quantization; the other entries of its requirements.txt — datasets, pyarrow, torchao, dill,
ninja, maturin, jinja2 — are not imported on that path). transformers gets quantmoe's version.

Idempotent: a stamp file records what was installed; a second call only checks the import.

    .venv/bin/python benches/gptqmodel_env.py          # create or check, print the python path
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".cache" / "bench" / "gptqmodel-venv"
GPTQMODEL = "gptqmodel==7.7.0"
TORCH = "torch==2.13.0"
# What `import gptqmodel` and a CPU quantization need (unpinned: whatever the index gives today).
RUNTIME_DEPS = ("accelerate", "safetensors", "tokenizers", "numpy", "threadpoolctl", "packaging", "device-smi",
                "logbar", "pypcre", "tokenicer", "defuser", "pillow", "protobuf", "requests")


def _python() -> Path:
    return VENV / "bin" / "python"


def _spec() -> dict:
    return {"gptqmodel": GPTQMODEL, "torch": TORCH,
            "transformers": f"transformers=={importlib.metadata.version('transformers')}",
            "deps": list(RUNTIME_DEPS)}


def _pip(*args: str, constraint: Path) -> None:
    cmd = [str(_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraint), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def check() -> dict:
    """Versions as the GPTQModel venv sees them; raises CalledProcessError if gptqmodel does not import."""
    code = ("import json, torch, transformers, gptqmodel; print(json.dumps({'torch': torch.__version__, "
            "'transformers': transformers.__version__, 'gptqmodel': gptqmodel.__version__, "
            "'cuda': torch.cuda.is_available()}))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(_python()), "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure() -> Path:
    """Create (once) the GPTQModel venv and return its python."""
    spec = _spec()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    stamp = VENV / ".bench-stamp"
    if not (stamp.exists() and stamp.read_text().strip() == digest):
        if not _python().exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        constraint = VENV / "torch-constraint.txt"
        constraint.write_text(TORCH + "\n")
        _pip(TORCH, constraint=constraint)
        _pip("--no-deps", GPTQMODEL, constraint=constraint)
        _pip(spec["transformers"], *RUNTIME_DEPS, constraint=constraint)
        stamp.write_text(digest + "\n")
    versions = check()
    if not versions["torch"].startswith("2.13.0"):
        raise RuntimeError(f"{VENV}: torch {versions['torch']} instead of {TORCH}; delete the folder and rerun")
    print(f"GPTQModel venv {VENV}: {json.dumps(versions)}", flush=True)
    return _python()


if __name__ == "__main__":
    print(ensure())
