"""The house rules of the pack's layout, read from the source: only ``antipure_comfy`` imports the host."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: top-level modules of ComfyUI (0.3.64) that a pack could import
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "nodes",
                "execution", "server", "node_helpers", "latent_preview", "app", "utils", "api_server", "protocol"}


def imported_modules(path: Path) -> set[str]:
    """The absolute top-level module names ``path`` imports (relative imports are the pack's own)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("folder", ["antipure_core", "nodes"])
def test_only_the_adapter_package_imports_the_host(folder):
    bad = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & HOST_MODULES)
           for p in sorted((ROOT / folder).rglob("*.py")) if imported_modules(p) & HOST_MODULES}
    assert not bad, f"import the host through antipure_comfy only: {bad}"


def test_nodes_reach_the_host_through_antipure_comfy():
    for p in sorted((ROOT / "nodes").glob("*.py")):
        tree = ast.parse(p.read_text(encoding="utf-8"))
        relative = {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.level == 2 and n.module}
        assert relative <= {"antipure_comfy", "antipure_core"}, f"{p.name} imports {relative}"


def test_no_workaround_around_the_nodes_name():
    """Nothing deletes the host's ``nodes`` from sys.modules or orders sys.path around the pack's nodes/."""
    for folder in ("antipure", "antipure_comfy", "benchmarks", "scripts", "tests"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p == Path(__file__).resolve():
                continue
            text = p.read_text(encoding="utf-8")
            assert 'del sys.modules["nodes"]' not in text and "sys.modules.pop(\"nodes\"" not in text, p
            assert "must win over" not in text, p
