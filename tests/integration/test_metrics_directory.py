"""The temporary stats file behind /metrics (no `stats_path` given) goes when its process exits."""

import subprocess
import sys
from pathlib import Path

MAKE_ONE = """
from pathlib import Path
from daop_vllm.vllm_adapter.options import DaopOptions
from daop_vllm.vllm_adapter.plugin import _serve_metrics

class EngineArgs:
    model_loader_extra_config = {"resident_fraction": 0.5}

args = EngineArgs()
_serve_metrics(args, DaopOptions.parse(args.model_loader_extra_config))
path = Path(args.model_loader_extra_config["stats_path"])
assert path.parent.is_dir() and args.model_loader_extra_config["resident_fraction"] == 0.5
print(path)
"""


def test_temporary_metrics_directory_is_removed_at_exit():
    done = subprocess.run([sys.executable, "-c", MAKE_ONE], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.name == "stats.json" and path.parent.name.startswith("daop-metrics-")
    assert not path.parent.exists(), f"{path.parent} left behind"
