"""The package's imports, read from its source (nothing is imported): no cycle, the layers in
order (core below everything; offline tools on core only), and imports inside functions only
where a module says why it must load the rest late."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "daop_vllm"

# Modules that import parts of the package inside functions, and why.
LATE_IMPORTS = {
    "daop_vllm.vllm_adapter.plugin": "vLLM imports it in every process at start-up: register() stays cheap",
    "daop_vllm.core.cpu_kernels": "the C extension is optional (no compiler: the executor uses torch)",
    "daop_vllm.core.device_path": "Triton is optional (the torch reference runs without it)",
    "daop_vllm.cli": "a subcommand loads torch and vLLM only when it runs (`--help` stays fast)",
    "daop_vllm.bench": "a benchmark loads vLLM only when it runs",
}
# What each layer may import from the package.
ALLOWED = {
    "daop_vllm.core": ("daop_vllm.core", "daop_vllm._cpu_experts"),
    "daop_vllm.offline": ("daop_vllm.core", "daop_vllm.offline"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported daop_vllm module, inside a function) for each import in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("daop_vllm"):
                for alias in child.names:  # `from daop_vllm.cli import bench` imports a module
                    candidate = f"{child.module}.{alias.name}"
                    found.append((candidate if candidate in MODULES | EXTENSIONS else child.module, inside))
            elif isinstance(child, ast.Import):
                found.extend((a.name, inside) for a in child.names if a.name.startswith("daop_vllm"))
            visit(child, inside)

    visit(tree, False)
    return found


FILES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
MODULES = set(FILES)
EXTENSIONS = {"daop_vllm._cpu_experts"}  # setup.py's C extension


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {name: imports_of(path) for name, path in FILES.items()}


def test_no_import_cycle():
    edges = {name: {target for target, _ in found if target in MODULES and target != name}
             for name, found in graph().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)


def test_layers_import_only_what_is_below_them():
    for name, found in graph().items():
        for layer, allowed in ALLOWED.items():
            if name == layer or name.startswith(layer + "."):
                wrong = [target for target, _ in found if not target.startswith(allowed)]
                assert not wrong, f"{name} imports {wrong}; {layer} may import only {allowed}"


def test_late_imports_only_where_a_module_says_why():
    for name, found in graph().items():
        late = [target for target, inside in found if inside]
        if late:
            assert any(name == m or name.startswith(m + ".") for m in LATE_IMPORTS), (
                f"{name} imports {late} inside functions; import at the top, or list the module in LATE_IMPORTS "
                "with the reason")
