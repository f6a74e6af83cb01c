"""One workflow over a folder of images, in this process, through the host's own executor.

For every image the image-loading node gets the image, the prompt is executed
with ``execution.PromptExecutor`` (models stay loaded from one image to the
next), and what the saving nodes save lands in ``OUT/<image stem>/`` with a row
in ``OUT/results.csv`` (see :mod:`antipure.results` for how nothing is left
half-written and how ``resume`` works).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

from .comfyui import headless_server
from .errors import EXIT_BAD_WORKFLOW, RunnerError
from .prompts import set_image, title, validate
from .image_check import check_images
from .text_outputs import TextOutputs, collect_text
from .results import STAGING, ImageResult, ResultsTable, Staging, refused_inputs, reported_files

__all__ = ["BatchRunner", "run_batch"]


def _snapshot(folder: Path) -> dict[str, float]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime for p in folder.rglob("*")
            if p.is_file() and p.relative_to(folder).parts[0] != STAGING}


class BatchRunner:
    """Runs one API prompt repeatedly with different input images (models stay cached).

    Args:
        prompt: API prompt (after :func:`antipure.prompts.apply_sets`); not modified.
        image_input: (node id, input name) that receives each image's file name.
        lines: print one line per node started and per progress step (for a log, where bars do not show).
    """

    def __init__(self, prompt: dict, image_input: tuple[str, str], lines: bool = False):
        import comfy.utils
        import execution

        self.prompt, self.image_input = prompt, image_input
        self.server = headless_server()
        self.server.on_event = self._on_event
        self.executor = execution.PromptExecutor(self.server, cache_type=False)
        self.errors: list[dict] = []
        self.node_bar = None  # a tqdm bar for the running node's own steps
        self.lines, self.node, self.t0 = lines, None, time.perf_counter()
        comfy.utils.set_progress_bar_global_hook(self._on_progress)

    def _on_event(self, event: str, data: Any) -> None:
        if event in ("execution_error", "execution_interrupted"):
            self.errors.append({"event": event, **(data if isinstance(data, dict) else {})})
        elif event == "executing" and isinstance(data, dict):
            node = self.node = data.get("node")
            if node in self.prompt and self.lines:
                print(f"[{time.perf_counter() - self.t0:6.1f} s] node {node} {title(self.prompt, node)}", flush=True)
            if node in self.prompt and self.node_bar is not None:
                self.node_bar.set_description_str(f"node {node} {title(self.prompt, node)}"[:40])
                self.node_bar.reset(total=1)

    def _on_progress(self, value, total, preview=None, prompt_id=None, node_id=None):
        node = node_id or self.node
        if self.lines and total and node in self.prompt:
            print(f"[{time.perf_counter() - self.t0:6.1f} s]   {title(self.prompt, node)}: step {value}/{total}",
                  flush=True)
        if self.node_bar is not None and total:
            if self.node_bar.total != total:
                self.node_bar.reset(total=total)
            self.node_bar.n = value
            self.node_bar.refresh()

    async def run_image(self, image: Path, out_dir: Path, input_dir: Path) -> ImageResult:
        """Execute the prompt for one image with ``out_dir`` as the host's output folder.

        Nodes with a ``filename_prefix`` save under ``out_dir/.partial/<token>/<image stem>/``,
        moved to ``out_dir/<image stem>/`` once the image is done: the folder goes into the
        prefix because the executor keeps node objects (and the output folder SaveImage took
        when it was made) from one image to the next. Files a node writes elsewhere under
        ``out_dir`` are listed too.
        """
        import folder_paths

        result = ImageResult(image=image.name)
        staging = Staging(out_dir, image.stem)
        shutil.copy2(image, input_dir / image.name)
        prompt = set_image(self.prompt, self.image_input, image.name, staging.prefix_folder())
        out_dir.mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(out_dir))
        before = _snapshot(out_dir)
        t0 = time.perf_counter()
        problems, outputs = await validate(prompt)
        if problems:
            result.status, result.error = "invalid", "; ".join(problems)
            return result
        self.errors = []
        prompt_id = str(uuid.uuid4())
        self.server.last_prompt_id = prompt_id
        try:
            await self.executor.execute_async(prompt, prompt_id, {"client_id": "antipure-runner"}, outputs)
        finally:
            result.seconds = round(time.perf_counter() - t0, 3)
        if self.errors or not self.executor.success:
            staging.discard()
            err = self.errors[0] if self.errors else {}
            result.status = "interrupted" if err.get("event") == "execution_interrupted" else "error"
            result.error = (f"node {err.get('node_id')} ({err.get('node_type')}): "
                            f"{err.get('exception_type', '')}: {err.get('exception_message', '')}").strip()
            return result
        reported = [staging.local_name(sub, name)
                    for sub, name in reported_files(self.executor.history_result.get("outputs", {}))]
        staged = staging.files()
        result.text = staging.published(self._text(prompt))
        reports = staging.write_reports(result.text.reports)
        files = staging.commit([f for f in reported if f in staged] + staged + reports)
        changed = sorted(f for f, t in _snapshot(out_dir).items()
                         if before.get(f) != t and f != "results.csv" and f not in files)
        result.outputs = files + changed
        return result

    def _text(self, prompt: Mapping[str, dict]) -> TextOutputs:
        import nodes

        outputs, ui = {}, {}
        for node_id in prompt:
            data = self.executor.caches.outputs.get(node_id)
            outputs[node_id] = getattr(data, "outputs", data)  # newer hosts wrap outputs in a cache entry
            ui[node_id] = (self.executor.caches.ui.get(node_id) or {}).get("output") or {}
        return collect_text(prompt, nodes.NODE_CLASS_MAPPINGS, outputs, ui)


async def run_batch(prompt: dict, image_input: tuple[str, str], images: Sequence[Path], out: Path,
                    progress: bool = True, resume: bool = False) -> list[ImageResult]:
    """Run ``prompt`` once per image (booted host, validated prompt); writes ``out/results.csv``.

    With ``resume``, images that ``out/results.csv`` lists as ``ok`` are skipped. Every image is
    decoded first (:mod:`antipure.image_check`): one that cannot be read completely gets an
    ``invalid`` row and is not run. The host's input/output/temp folders and progress hook are
    restored afterwards.

    Returns:
        The results of the images run now: the refused ones, then the others in order.

    Raises:
        RunnerError: (exit 3) the prompt does not validate with the first image.
    """
    import comfy.utils
    import folder_paths
    from tqdm.auto import tqdm

    out = Path(out).resolve()
    table = ResultsTable(out, resume=resume)
    images = [im for im in images if im.name not in table.finished()]
    table.clear_unfinished(im.stem for im in images)  # a killed run's half-committed outputs
    described, bad = check_images(images)
    results: list[ImageResult] = refused_inputs(bad)
    for res in results:
        table.add(res)
        print(f"{res.image}: invalid: {res.error}", file=sys.stderr)
    images = list(described)
    if not images:
        return results
    saved = (folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory(), comfy.utils.PROGRESS_BAR_HOOK)
    disable = None if progress else True  # None: tqdm shows bars on a terminal only
    with tempfile.TemporaryDirectory(prefix="antipure-run-") as tmp:
        input_dir, temp_dir = Path(tmp, "input"), Path(tmp, "temp")
        input_dir.mkdir()
        temp_dir.mkdir()
        folder_paths.set_input_directory(str(input_dir))
        folder_paths.set_temp_directory(str(temp_dir))
        try:
            # validate once up front with the first image so a broken workflow fails fast
            shutil.copy2(images[0], input_dir / images[0].name)
            problems, _ = await validate(set_image(prompt, image_input, images[0].name, images[0].stem))
            if problems:
                raise RunnerError(EXIT_BAD_WORKFLOW, "invalid workflow:\n  - " + "\n  - ".join(problems))
            runner = BatchRunner(prompt, image_input, lines=progress and not sys.stderr.isatty())
            bar = tqdm(images, desc="images", unit="img", disable=disable, position=0)
            runner.node_bar = tqdm(total=1, desc="node", position=1, leave=False, disable=disable)
            try:
                for image in bar:
                    if runner.lines:
                        print(f"{image.name}: {described[image]}", flush=True)
                    res = await runner.run_image(image, out, input_dir)
                    res.input = described[image]
                    results.append(res)
                    table.add(res)
                    if res.status != "ok":
                        tqdm.write(f"{image.name}: {res.status}: {res.error}", file=sys.stderr)
                    bar.set_postfix_str(f"{image.name}: {res.status}")
            finally:
                runner.node_bar.close()
                bar.close()
                runner.server.on_event = None
        finally:
            folder_paths.set_input_directory(saved[0])
            folder_paths.set_output_directory(saved[1])
            folder_paths.set_temp_directory(saved[2])
            comfy.utils.set_progress_bar_global_hook(saved[3])
    return results
