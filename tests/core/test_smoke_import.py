import subprocess
import sys
from pathlib import Path


def test_core_imports_without_host():
    # a fresh interpreter: in a session that also runs the host tests, ComfyUI is already imported
    code = ("import sys, antipure_core.protect, antipure_core.purify, antipure_core.customize, "
            "antipure_core.metrics; assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_pack_imports_without_host():
    """The pack's __init__ resolves nothing from the host until the host calls comfy_entrypoint."""
    root = Path(__file__).resolve().parents[2]
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('pack', 'pack_init.py'"
            .replace("'pack_init.py'", repr(str(root / '__init__.py'))) +
            "); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert callable(m.comfy_entrypoint) and 'comfy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
