"""One venv per peer tool, on the CPU build of torch, for benches/bench_peers.py.

Same recipe as gptqmodel_env.py: the venv lives under .cache/bench/, torch 2.13.0 (the CPU
wheel on local disk) is installed first and pinned by a constraint file on every pip call,
together with quantmoe's transformers version, so that no peer can pull another torch or
transformers; then the peer at an exact version. A stamp file records what was installed;
a second call only checks the import.

    .venv/bin/python benches/peer_envs.py hqq           # create or check, print the python path
    .venv/bin/python benches/peer_envs.py autoround
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class PeerEnv:
    name: str  # venv folder .cache/bench/<name>-venv
    packages: tuple[str, ...]  # exact pins
    module: str  # what `import` must work; its __version__ is reported

    @property
    def venv(self) -> Path:
        return ROOT / ".cache" / "bench" / f"{self.name}-venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


PEERS = {
    "hqq": PeerEnv("hqq", ("hqq==0.2.8",), "hqq"),
    "autoround": PeerEnv("autoround", ("auto-round==0.16.1",), "auto_round"),
}


def _transformers() -> str:
    return f"transformers=={importlib.metadata.version('transformers')}"


def _pip(env: PeerEnv, *args: str, constraint: Path) -> None:
    cmd = [str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(constraint), *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def check(env: PeerEnv) -> dict:
    """Versions as the peer's venv sees them; raises CalledProcessError if the peer does not import."""
    code = (f"import json, torch, transformers, {env.module} as m; print(json.dumps({{'torch': torch.__version__, "
            f"'transformers': transformers.__version__, '{env.name}': getattr(m, '__version__', '?')}}))")
    run_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([str(env.python), "-c", code], check=True, capture_output=True, text=True, env=run_env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure(name: str) -> Path:
    """Create (once) the venv of peer ``name`` and return its python."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}: one of {', '.join(PEERS)}")
    env = PEERS[name]
    spec = {"torch": TORCH, "transformers": _transformers(), "packages": list(env.packages)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    stamp = env.venv / ".bench-stamp"
    if not (stamp.exists() and stamp.read_text().strip() == digest):
        if not env.python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(env.venv)], check=True)
        constraint = env.venv / "constraint.txt"
        constraint.write_text(f"{TORCH}\n{spec['transformers']}\n")
        _pip(env, TORCH, constraint=constraint)
        _pip(env, *env.packages, spec["transformers"], constraint=constraint)
        stamp.write_text(digest + "\n")
    versions = check(env)
    if not versions["torch"].startswith("2.13.0"):
        raise RuntimeError(f"{env.venv}: torch {versions['torch']} instead of {TORCH}; delete the folder and rerun")
    print(f"{name} venv {env.venv}: {json.dumps(versions)}", flush=True)
    return env.python


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEERS):
        print(ensure(peer))
