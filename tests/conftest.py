import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models run fastest on one thread, and CI has two shared cores.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a whole module (several threads on a busy machine: tiny matmuls ~400x slower),
    restored after it: some tests set the thread count (`--threads`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Mixtral with the embedded tokenizer, saved as a local model folder."""
    from quantmoe.anatomy import tiny_model
    from quantmoe.models import embedded_root

    folder = tmp_path_factory.mktemp("tiny-mixtral")
    model = tiny_model("mixtral", vocab_size=8192, max_position_embeddings=256)
    model.save_pretrained(folder)
    for f in (embedded_root() / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder
