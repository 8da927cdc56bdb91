"""`vllm serve` processes on loopback, for the serving benchmark and the integration tests."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

VLLM = str(Path(sys.executable).with_name("vllm"))
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "16", "--seed", "0",
              "--gpu-memory-utilization", "0.3", "--enforce-eager"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def vllm_server(model: str, *extra: str, log_path: Path, startup_s: float = 300.0, pids: list | None = None):
    """Start `vllm serve`, wait until /health answers, yield the base URL; stop with SIGINT
    (vLLM's graceful shutdown) at exit. `pids`, if given, receives the server's process id."""
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs vLLM's default engine
    with open(log_path, "w") as log:
        proc = subprocess.Popen([VLLM, "serve", model, "--host", "127.0.0.1", "--port", str(port), *SERVE_ARGS, *extra],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        if pids is not None:
            pids.append(proc.pid)
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve did not start in {startup_s} s: {log_path.read_text()[-3000:]}")
                time.sleep(1)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
