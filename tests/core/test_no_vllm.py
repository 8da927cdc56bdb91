import subprocess
import sys


def test_core_engine_imports_without_vllm():
    """The core engine must run where vLLM is absent (the GPU test machine has none)."""
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import pkgutil, importlib, daop_vllm.core as core\n"
        "for m in pkgutil.iter_modules(core.__path__): importlib.import_module('daop_vllm.core.' + m.name)\n"
        "import daop_vllm.cli.model_builder\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
