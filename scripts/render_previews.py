"""Render ``example_workflows/<name>.jpg`` previews with the host's real web frontend.

For each workflow JSON this starts ComfyUI's own server on loopback (CPU, a
throw-away base directory whose ``custom_nodes/`` links to this pack, so the
pack's nodes draw with their real widgets), opens the page in headless
Chromium through Playwright, loads the workflow with ``app.loadGraphData``,
fits the view, hides the menus and dialogs and saves a JPEG of the canvas
next to the workflow (the name the host's template browser looks for).

    COMFYUI_PATH=/path/to/ComfyUI python scripts/render_previews.py            # example_workflows/*.json
    python scripts/render_previews.py some/flow.json --out-dir /tmp/previews

Needs Playwright for Python (``pip install playwright``) and a Chromium
binary (Debian: ``apt-get install chromium``); Playwright's own browser
download is not used. Exit codes: 0 done, 1 a preview failed or came out
blank, 2 ComfyUI, Playwright or Chromium missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT))

from antipure.comfyui import ServerProcess, find_comfyui  # noqa: E402
from antipure.errors import RunnerError  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# frontend settings for a clean canvas: no first-run template browser, minimap, zoom menu, fps info,
# full-detail nodes at any zoom and no source badge on every node
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasMenu": False,
            "Comfy.Graph.CanvasInfo": False, "Comfy.EnableTooltips": False, "Comfy.Validation.Workflows": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.NodeBadge.NodeSourceBadgeMode": "None"}
# everything drawn over the canvas: menus, side bar, toasts, dialogs, the node search box
HIDE_CSS = """
body > *:not(#vue-app), .comfyui-menu, .comfyui-body-top, .comfyui-body-left, .comfyui-body-right,
.comfyui-body-bottom, .side-tool-bar-container, .p-toast, .p-dialog-mask, .p-dialog, .graph-canvas-menu,
.comfy-menu, .workflow-tabs-container, .actionbar, .bottom-panel, .splitter-overlay-bottom,
[class*="minimap"], .p-tooltip, .litegraph .dialog, .selection-toolbox { display: none !important; }
"""


class PreviewError(RuntimeError):
    """A preview could not be made; ``code`` is the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def find_chromium(explicit: str | None = None) -> str:
    """Path of a Chromium binary (``explicit``, ``$CHROMIUM``, then the usual Debian paths)."""
    for path in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES, shutil.which("chromium")):
        if path and Path(path).is_file():
            return path
    raise PreviewError("no Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)", 2)


def _pack_name(pack_dir: Path) -> str:
    """The folder name a user's install has (the frontend shows it as the nodes' source badge):
    the project name from pyproject.toml, else the checkout's folder name."""
    try:
        import tomllib

        return tomllib.loads((pack_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]["name"]
    except (ImportError, OSError, KeyError, ValueError):
        return pack_dir.name


@contextlib.contextmanager
def comfy_server(comfy_root: Path, pack_dir: Path = PACK_ROOT, timeout: float = 180.0, log=None):
    """Run ComfyUI's ``main.py`` on a free loopback port with the pack linked into a temporary
    ``custom_nodes/`` under its project name; yields the base URL and stops the server afterwards."""
    with tempfile.TemporaryDirectory(prefix="antipure-preview-") as base:
        base = Path(base)
        user = base / "user" / "default"
        user.mkdir(parents=True)
        (user / "comfy.settings.json").write_text(json.dumps(SETTINGS))
        server = ServerProcess(comfy_root, base, pack_dir=pack_dir, link_name=_pack_name(pack_dir))
        try:
            try:
                url = server.wait_ready(timeout)
            except RunnerError as e:
                raise PreviewError(str(e)) from e
            yield url
        finally:
            server.stop()
            if log is not None:
                log.write(server.log.read_text())


def pixel_std(path: Path) -> float:
    """Pixel standard deviation of an image (a blank canvas is ~0)."""
    from PIL import Image, ImageStat

    with Image.open(path) as im:
        return float(sum(ImageStat.Stat(im.convert("RGB")).stddev) / 3)


BOUNDS_JS = """() => {
    const g = window.app.graph, b = [Infinity, Infinity, -Infinity, -Infinity];
    for (const o of [...(g.nodes || g._nodes || []), ...(g.groups || g._groups || [])]) {
        const r = o.boundingRect;
        b[0] = Math.min(b[0], r[0]); b[1] = Math.min(b[1], r[1]);
        b[2] = Math.max(b[2], r[0] + r[2]); b[3] = Math.max(b[3], r[1] + r[3]);
    }
    return b.every(Number.isFinite) ? [b[0] - 10, b[1] - 10, b[2] - b[0] + 20, b[3] - b[1] + 20] : null;
}"""
FIT = 0.92  # share of the picture the graph fills
MAX_OVERSIZE = 3.0  # a big graph is drawn on a canvas up to 3x the picture, then scaled down


def _screenshot(page, data: dict, width: int, height: int, crop: bool = False):
    """Load one workflow into the page and return the canvas as a ``width`` x ``height`` PIL image.

    The frontend simplifies nodes (no text) when they are drawn small, so a graph larger than
    the picture is drawn on a proportionally larger canvas at readable zoom and scaled down.
    With ``crop`` the picture is cut to the graph (``width`` wide, height from the graph's
    shape): no empty canvas around it, so a thumbnail of it is as large as it can be.
    """
    from PIL import Image

    page.set_viewport_size({"width": width, "height": height})
    page.evaluate("""async (g) => {
        await window.app.loadGraphData(g, true, false, null,
            {showMissingNodesDialog: false, showMissingModelsDialog: false});
    }""", data)
    page.wait_for_timeout(500)  # node sizes are known after the first frame
    bounds = page.evaluate(BOUNDS_JS)
    if bounds is None:
        raise PreviewError("the workflow has no nodes to draw")
    k = min(MAX_OVERSIZE, max(1.0, bounds[2] / (FIT * width), bounds[3] / (FIT * height)))
    if k > 1.0:
        page.set_viewport_size({"width": round(width * k), "height": round(height * k)})
        page.wait_for_timeout(300)
    view = page.evaluate("""([b, zoom]) => {
        const c = window.app.canvas;
        c.resize?.();
        c.deselectAll?.();
        c.ds.fitToBounds(b, {zoom});
        c.setDirty(true, true);
        c.draw(true, true);
        return [c.ds.scale, c.ds.offset[0], c.ds.offset[1]];
    }""", [bounds, FIT])
    page.wait_for_timeout(300)
    png = page.locator("#graph-canvas").screenshot(type="png")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if crop:  # screen = (graph + offset) * scale
        scale, ox, oy = view
        box = [(bounds[0] + ox) * scale, (bounds[1] + oy) * scale,
               (bounds[0] + bounds[2] + ox) * scale, (bounds[1] + bounds[3] + oy) * scale]
        image = image.crop([max(0, round(box[0])), max(0, round(box[1])),
                            min(image.width, round(box[2])), min(image.height, round(box[3]))])
        height = round(width * image.height / image.width)
    return image.resize((width, height), Image.LANCZOS) if image.size != (width, height) else image


def _launch(pw, profile: str, chromium: str, width: int, height: int, attempts: int = 3):
    """Start Chromium; on a loaded machine its first start now and then never answers, so retry."""
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(attempts):
        try:
            return pw.chromium.launch_persistent_context(
                profile, executable_path=chromium, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": width, "height": height}, device_scale_factor=1, timeout=90_000)
        except PlaywrightError as e:
            if attempt == attempts - 1:
                raise PreviewError(f"Chromium ({chromium}) did not start: {str(e)[:500]}") from None
            shutil.rmtree(profile, ignore_errors=True)
            os.makedirs(profile, exist_ok=True)


@contextlib.contextmanager
def frontend_page(comfy_root: Path, chromium: str, width: int = 1280, height: int = 800):
    """The host's web frontend, served by its own server, open in headless Chromium.

    Yields ``(page, errors)``: a Playwright page with ``window.app`` ready, and the list the
    page's uncaught errors are appended to.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise PreviewError("Playwright for Python is missing: pip install playwright "
                           "(the browser comes from the system: apt-get install chromium)", 2) from None
    with comfy_server(comfy_root) as url, sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = _launch(pw, profile, chromium, width, height)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(f"{e} {(e.stack or '')[:300]}"))
            page.goto(url, wait_until="load", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            page.add_style_tag(content=HIDE_CSS)
            yield page, errors
        finally:
            browser.close()


def frontend_prompt(page, data: dict) -> dict:
    """The API prompt the frontend itself makes from a UI workflow (``app.graphToPrompt``), for
    checking :func:`antipure.workflow_format.ui_to_api` against the real thing."""
    return page.evaluate("""async (g) => {
        await window.app.loadGraphData(g, true, false, null,
            {showMissingNodesDialog: false, showMissingModelsDialog: false});
        return (await window.app.graphToPrompt()).output;
    }""", data)


def render(workflows: list[Path], out_dir: Path | None, page, width: int = 1280, height: int = 800,
           quality: int = 85, min_std: float = 4.0, errors: list[str] | None = None,
           crop: bool = False) -> list[Path]:
    """Screenshot each workflow in a :func:`frontend_page` (``crop``: cut to the graph, see
    :func:`_screenshot`); returns the JPEG paths.

    Raises:
        PreviewError: a picture came out blank (pixel standard deviation below ``min_std``).
    """
    errors = errors if errors is not None else []
    written = []
    for wf in workflows:
        target = (out_dir or wf.parent) / (wf.stem + ".jpg")
        shot = _screenshot(page, json.loads(wf.read_text(encoding="utf-8")), width, height, crop)
        target.parent.mkdir(parents=True, exist_ok=True)
        shot.save(target, "JPEG", quality=quality, optimize=True)
        std = pixel_std(target)
        if std < min_std:
            raise PreviewError(f"{target}: the screenshot is blank (pixel std {std:.2f}); "
                               f"page errors: {errors[-3:]}")
        written.append(target)
        print(f"{wf} -> {target} (pixel std {std:.1f})")
        errors.clear()  # only reported for a blank picture: the frontend logs harmless ones
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workflows", nargs="*", type=Path, help="workflow JSON files (default: example_workflows/*.json)")
    p.add_argument("--out-dir", type=Path, help="where to write the .jpg files (default: next to each workflow)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH or the pack's location)")
    p.add_argument("--chromium", help="Chromium binary (default: $CHROMIUM or /usr/bin/chromium)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=800)
    p.add_argument("--full-frame", action="store_true",
                   help="keep the whole width x height frame (default: cut the picture to the graph)")
    ns = p.parse_args(argv)
    workflows = ns.workflows or sorted((PACK_ROOT / "example_workflows").glob("*.json"))
    if not workflows:
        print("no workflows to render", file=sys.stderr)
        return 1
    try:
        comfy_root, chromium = find_comfyui(ns.comfyui), find_chromium(ns.chromium)
        with frontend_page(comfy_root, chromium, ns.width, ns.height) as (page, errors):
            render([Path(w) for w in workflows], ns.out_dir, page, ns.width, ns.height, errors=errors,
                   crop=not ns.full_frame)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except PreviewError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
