"""Apply the patch files of `patches/` to the installed vLLM, idempotently.

`make demo` / `make test` run this after installing; a user who installed with pip runs
`daop-vllm patch-vllm` once. A patch already applied is left alone.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path


def vllm_site_packages() -> Path:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise RuntimeError("vLLM is not installed: pip install 'daop-vllm[cpu]' (or [cuda]) first")
    return Path(spec.origin).parent.parent


def _patch(args: list[str], patch_text: bytes, root: Path) -> bool:
    result = subprocess.run(["patch", "-p1", "-s", "-f", "-d", str(root), *args], input=patch_text, capture_output=True)
    return result.returncode == 0


def apply_patches(root: Path | None = None) -> list[tuple[str, str]]:
    """Apply every patch to the vLLM under `root` (default: the installed one).
    Returns (patch name, "applied" | "already applied") pairs; raises if one does not fit."""
    if shutil.which("patch") is None:
        raise RuntimeError("the 'patch' program is needed to patch vLLM (Debian/Ubuntu: apt-get install patch)")
    root = root or vllm_site_packages()
    results = []
    for patch_file in sorted(p for p in files("daop_vllm.vllm_patches").iterdir() if p.name.endswith(".patch")):
        text = patch_file.read_bytes()
        if _patch(["-R", "--dry-run"], text, root):
            results.append((patch_file.name, "already applied"))
        elif _patch(["-N", "--dry-run"], text, root) and _patch(["-N"], text, root):
            results.append((patch_file.name, "applied"))
        else:
            raise RuntimeError(f"{patch_file.name} does not apply to the vLLM in {root}: is it vLLM 0.32.0?")
    return results


def add_parser(commands) -> None:
    patch = commands.add_parser("patch-vllm", help="apply patches/ to the installed vLLM (idempotent; `make` does it)")
    patch.set_defaults(run=run)


def run(args) -> None:
    for name, status in apply_patches():
        print(f"{name}: {status}")
