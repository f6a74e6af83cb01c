"""Host test harness: boot ComfyUI once, tiny checkpoints, graph runner, progress recording.

Without a host every test file here reports one skipped test saying why
(``COMFYUI_PATH`` unset, torch or ComfyUI not importable). With
``ANTIPURE_REQUIRE_HOST=1`` (what CI sets) a missing host and any skip under
``tests/nodes`` are failures instead, so no host test can silently stop running. Test modules may
import host modules at top level: they are only imported when the host booted,
which happens while pytest collects this folder (so in a run over all of
``tests/``, ``comfy`` is imported before the core tests run).

Fixtures (session-scoped unless noted):

* ``host``: :class:`tests.nodes.host.Host` (``host.pack`` is the pack as the
  host loaded it; ``host.pack_import("antipure_comfy.bridge")`` imports a pack module).
* ``models_dir``: the temporary folder registered as the host's checkpoints
  folder; ``tiny_checkpoint(family)`` builds ``tiny_<family>.safetensors``
  there on first use and returns the name ``CheckpointLoaderSimple`` takes
  (families: ``sd15``, ``sd20v``, ``sdxl``; image sides multiples of 16 px);
  ``tiny_pixel_checkpoint`` is a tiny random ADM's name for AntiPure Load Pixel Diffusion;
  ``tiny_model(family)`` returns ``(MODEL, CLIP, VAE)`` loaded once by
  ``CheckpointLoaderSimple`` under ``torch.inference_mode()`` as the executor
  runs nodes (shared by all tests: patch a ``model.clone()``, never the
  object); ``encode_text(clip, text)`` returns a CONDITIONING.
* ``output_dir``: the host's output folder, a temporary folder (its temp folder too).
* ``graph``: a :class:`tests.nodes.graph.GraphRunner` (function scope, fresh
  cache each test); ``GraphBuilder`` comes from ``tests.nodes.graph``.
* ``progress`` (function scope): list receiving ``(node_id, value, total)`` for
  every host progress update while the test runs outside a graph.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nodes.host import PACK_DIR, boot, find_comfyui

REQUIRE_HOST = os.environ.get("ANTIPURE_REQUIRE_HOST") == "1"
_ROOT, _REASON = find_comfyui()
HOST = None
if _ROOT is not None:
    try:
        HOST = boot(_ROOT)
    except RuntimeError as e:
        _REASON = f"ComfyUI at {_ROOT} cannot be used: {e}"


class _NoHostItem(pytest.Item):
    def runtest(self):
        if REQUIRE_HOST:
            pytest.fail(f"ANTIPURE_REQUIRE_HOST=1 but no usable host: {_REASON}", pytrace=False)
        pytest.skip(_REASON)

    def reportinfo(self):
        return self.path, None, f"{self.name}: {_REASON}"


class _NoHostFile(pytest.File):
    def collect(self):
        yield _NoHostItem.from_parent(self, name=self.path.stem)


def pytest_pycollect_makemodule(module_path, parent):
    # without a host, do not import the test module (it may import the host at top level)
    if HOST is None:
        return _NoHostFile.from_parent(parent, path=module_path)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_HOST and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"host test skipped although ANTIPURE_REQUIRE_HOST=1: {reason}"


@pytest.fixture(scope="session")
def host():
    return HOST


@pytest.fixture(scope="session")
def models_dir(host, tmp_path_factory):
    import folder_paths

    # on disk under pytest's tmp dir, not in /dev/shm: a killed run would leave its ~1 GB there in RAM
    folder = tmp_path_factory.mktemp("models")
    folder_paths.add_model_folder_path("checkpoints", str(folder), is_default=True)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(models_dir):
    from tests.nodes import tiny_checkpoints

    tiny_checkpoints.register()

    def get(family: str) -> str:
        path = models_dir / f"tiny_{family}.safetensors"
        if not path.exists():
            tiny_checkpoints.build(models_dir, [family])
        return path.name
    return get


@pytest.fixture(scope="session")
def tiny_pixel_checkpoint(host, tmp_path_factory):
    """Name of a tiny random ADM (.safetensors, 32-channel heads) in a registered ``pixel_diffusion`` folder."""
    import folder_paths
    from antipure.random_pixel import save_random_adm

    folder = tmp_path_factory.mktemp("pixel_diffusion")
    folder_paths.add_model_folder_path("pixel_diffusion", str(folder), is_default=True)
    return save_random_adm(folder / "tiny_adm.safetensors").name


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import torch
    import nodes

    cache = {}

    def get(family: str):
        if family not in cache:
            with torch.inference_mode():
                cache[family] = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint(family))[:3]
        return cache[family]
    return get


@pytest.fixture(scope="session")
def encode_text(host):
    import torch
    import nodes

    def encode(clip, text: str = "a photo of sks person"):
        with torch.inference_mode():
            return nodes.CLIPTextEncode().encode(clip, text)[0]
    return encode


@pytest.fixture(scope="session")
def output_dir(host, tmp_path_factory):
    import folder_paths

    folder = tmp_path_factory.mktemp("output")
    folder_paths.set_output_directory(str(folder))
    # the host's temp/ (previews, the loss graph of its training nodes) exists only once main.py made it,
    # and a shared ComfyUI checkout may be read-only
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
    return folder


@pytest.fixture
def graph(host, models_dir, output_dir):
    from tests.nodes.graph import GraphRunner

    return GraphRunner()


@pytest.fixture
def progress(host):
    import comfy.utils

    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, prompt_id=None, node_id=None):
        seen.append((node_id, value, total))
    comfy.utils.set_progress_bar_global_hook(hook)
    yield seen
    comfy.utils.set_progress_bar_global_hook(previous)


__all__ = ["HOST", "PACK_DIR"]
