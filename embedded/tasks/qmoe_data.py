"""Dataset loader of the quantmoe local suite, for lm-eval's ``custom_dataset``.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset`` unchanged, so a
relative path would be read from the working directory. Here it is read from this folder,
whatever the working directory.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(data_files: dict[str, str], **_metadata):
    import datasets

    return datasets.load_dataset("json", data_files={split: str(HERE / name) for split, name in data_files.items()})
