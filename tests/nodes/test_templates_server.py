"""The shipped workflows as ComfyUI's template browser gets them: from a real server, over HTTP.

The in-process tests cannot see which folder the server mounts for a pack's
templates: ``GET /api/workflow_templates`` lists ``*.json`` from every template
folder, but ``/api/workflow_templates/<pack>/<file>`` is served from the first
existing one of ``example_workflows``, ``example``, ``examples``, ``workflow``,
``workflows`` (app/custom_node_manager.py). So this starts ``main.py`` with the
pack linked into a temporary ``custom_nodes/`` and fetches every card's
workflow and thumbnail the way the frontend does.
"""
from __future__ import annotations

import importlib.util
import io
import json
import urllib.error
import urllib.request

import pytest
from PIL import Image

from tests.nodes.host import PACK_DIR

TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")  # the host's order
SHIPPED = {"antipure_protect", "antipure_stress_test", "antipure_baseline_comparison"}


def _render_previews():
    """``scripts/render_previews.py``, whose ``comfy_server`` starts the host with this pack."""
    spec = importlib.util.spec_from_file_location("render_previews", PACK_DIR / "scripts" / "render_previews.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@pytest.fixture(scope="module")
def server(host):
    """``(base url, pack folder name)`` of a running ComfyUI server with this pack installed."""
    render_previews = _render_previews()
    with render_previews.comfy_server(host.root) as url:
        yield url, render_previews._pack_name(PACK_DIR)


def test_one_template_folder_and_it_is_the_preferred_one():
    present = [name for name in TEMPLATE_FOLDERS if (PACK_DIR / name).exists()]
    assert present == ["example_workflows"], (
        f"template folders in the pack: {present}; the host serves only the first, so keep the "
        "workflows in example_workflows/ and no other folder of those names")


def test_every_listed_template_and_thumbnail_is_served(server):
    url, pack = server
    status, body = _get(url + "/api/workflow_templates")
    assert status == 200
    listed = json.loads(body)
    assert pack in listed, f"the server lists no templates for {pack}: {listed}"
    names = listed[pack]
    assert set(names) >= SHIPPED
    failures = []
    for name in sorted(names):
        status, body = _get(f"{url}/api/workflow_templates/{pack}/{name}.json")
        if status != 200:
            failures.append(f"{name}.json: HTTP {status}")
        else:
            data = json.loads(body)
            if not (isinstance(data.get("nodes"), list) and data["nodes"] and isinstance(data.get("links"), list)):
                failures.append(f"{name}.json: not a UI workflow with nodes and links")
        status, body = _get(f"{url}/api/workflow_templates/{pack}/{name}.jpg")
        if status != 200:
            failures.append(f"{name}.jpg: HTTP {status}")
        else:
            with Image.open(io.BytesIO(body)) as im:
                im.load()
                if im.format != "JPEG" or min(im.size) < 64:
                    failures.append(f"{name}.jpg: {im.format} {im.size}, expected a JPEG thumbnail")
    assert not failures, "templates the browser cannot open:\n" + "\n".join(failures)
