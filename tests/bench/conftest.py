import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Mixtral with the embedded tokenizer, saved as a local model folder."""
    from quantmoe.anatomy import tiny_model
    from quantmoe.zoo.embedded import embedded_root

    folder = tmp_path_factory.mktemp("tiny-mixtral")
    model = tiny_model("mixtral", vocab_size=8192, max_position_embeddings=256)
    model.save_pretrained(folder)
    for f in (embedded_root() / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder
