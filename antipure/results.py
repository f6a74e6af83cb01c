"""A batch's results on disk: ``OUT/results.csv`` and each image's output files, never half-written.

An image's outputs are first written under ``OUT/.partial/<token>/`` (a folder of
their own, so the host's file counters start at 00001 every time) and then
renamed into ``OUT/<image stem>/``; only after that is the image's row added to
``results.csv``, which is itself rewritten through a temporary file and a rename.
A run killed at any point leaves ``results.csv`` listing only images whose
outputs are complete; ``--resume`` skips those and redoes the others (their
partial files are overwritten or cleaned up).

Plain Python: no ComfyUI, no aiohttp.
"""

from __future__ import annotations

import csv
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from .text_outputs import TextOutputs

__all__ = ["ImageResult", "ResultsTable", "refused_inputs", "Staging", "reported_files", "FIXED_COLUMNS", "STAGING"]

STAGING = ".partial"
FIXED_COLUMNS = ["image", "lane", "status", "seconds", "outputs", "error", "input"]


@dataclass
class ImageResult:
    """One row of the results table; ``outputs`` are paths relative to OUT."""

    image: str
    status: str = "ok"
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    text: TextOutputs = field(default_factory=TextOutputs)  # columns, metrics per lane, reports
    error: str = ""
    input: str = ""  # what the input file holds (antipure.image_check), e.g. "PNG RGB 64x64 8-bit"


def refused_inputs(bad: Mapping[Path, str]) -> list[ImageResult]:
    """An ``invalid`` row for every input image that :func:`antipure.image_check.check_images` refused."""
    return [ImageResult(image=path.name, status="invalid", error=reason) for path, reason in bad.items()]


def reported_files(ui_outputs: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(subfolder, filename)`` of every output file the nodes reported in their UI results
    (SaveImage's ``images`` ...), in node order; temp previews are left out."""
    files = []
    for ui in ui_outputs.values():
        for items in (ui or {}).values():
            for item in items if isinstance(items, (list, tuple)) else []:
                if isinstance(item, dict) and "filename" in item and item.get("type", "output") == "output":
                    files.append((str(item.get("subfolder", "")), str(item["filename"])))
    return files


class Staging:
    """``OUT/.partial/<token>/``: where one attempt at one image writes its outputs.

    Args:
        out: the batch's output folder.
        image_stem: the image's name without extension: its outputs end in ``OUT/<image_stem>/``.
    """

    def __init__(self, out: Path, image_stem: str):
        self.token = uuid.uuid4().hex[:12]
        self.image_stem = image_stem
        self.root = Path(out) / STAGING / self.token

    def prefix_folder(self, base: str = STAGING) -> str:
        """The folder to put in front of every ``filename_prefix`` (relative to an output folder
        whose ``base/`` stands for this staging area)."""
        return f"{base}/{self.token}/{self.image_stem}"

    def local_name(self, subfolder: str, filename: str, base: str = STAGING) -> str | None:
        """Path relative to the staging root of a file a node saved as ``subfolder/filename`` (``None``
        when it is outside this attempt's prefix folder)."""
        rel = PurePosixPath(subfolder.replace("\\", "/")) / filename
        try:
            return str(rel.relative_to(PurePosixPath(base) / self.token))
        except ValueError:
            return None

    def published(self, text: TextOutputs, base: str = STAGING) -> TextOutputs:
        """``text`` with the staging folder taken out of every path a node named (e.g. Evaluate's
        "Appended to ``.partial/<token>/<stem>/antipure/r.json``"), so it names the files where
        :meth:`commit` puts them: relative to OUT."""
        return text.replace(f"{base}/{self.token}/", "")

    def write_reports(self, reports: Mapping[str, str]) -> list[str]:
        """Stage each report as ``<image stem>/<name>``; returns those names for :meth:`commit`."""
        names = []
        for name, body in reports.items():
            target = self.root / self.image_stem / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(body if body.endswith("\n") else body + "\n", encoding="utf-8")
            names.append(f"{self.image_stem}/{name}")
        return names

    def files(self) -> list[str]:
        """Every file written so far, relative to the staging root (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def commit(self, names: Iterable[str]) -> list[str]:
        """Rename the staged files into OUT (each ``os.replace`` is atomic) and drop the staging folder.

        Returns the same names, now relative to OUT.
        """
        names = list(dict.fromkeys(names))
        out = self.root.parent.parent
        for name in names:
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / name, target)
        self.discard()
        return names

    def discard(self) -> None:
        """Drop what this attempt staged (and ``.partial/`` itself once no attempt uses it)."""
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()
        except OSError:
            pass  # another attempt still stages there, or it is gone already


class ResultsTable:
    """``OUT/results.csv``: image, lane, status, seconds, outputs (';'-joined), error, input, then one
    column per one-line text and per metric (:mod:`antipure.text_outputs`). One row per image, or one
    per image and lane when the workflow scores lanes. Rewritten atomically each time an image is added.

    Args:
        out: the output folder (created).
        resume: keep the rows of images that finished ``ok`` in an existing table (the others are
            dropped and redone); otherwise the table starts empty.
    """

    def __init__(self, out: Path, resume: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.csv"
        self.columns = list(FIXED_COLUMNS)
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        shutil.rmtree(self.out / STAGING, ignore_errors=True)  # attempts of a run that was killed
        for tmp in self.out.glob(".results.csv.*.tmp"):  # a rewrite cut short by a kill
            tmp.unlink(missing_ok=True)
        if resume and self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns += [c for c in reader.fieldnames or [] if c not in self.columns]
                self.rows = {(r["image"], r.get("lane") or ""): r for r in reader if r.get("status") == "ok"}

    def clear_unfinished(self, stems: Iterable[str]) -> None:
        """Remove ``OUT/<stem>/`` of images about to be run: what is there has no ``ok`` row (a run
        killed while it renamed an image's files into place), and a new run must not mix with it."""
        done = {PurePosixPath(image).stem for image in self.finished()}
        for stem in stems:
            if stem not in done and stem not in ("", ".", "..", STAGING):
                shutil.rmtree(self.out / stem, ignore_errors=True)

    def finished(self) -> set[str]:
        """Image names (with extension) whose outputs are complete."""
        return {image for image, _ in self.rows}

    def add(self, result: ImageResult) -> None:
        """Record one image (replacing its earlier rows) and rewrite the file; rows are sorted by image
        name, then lane, so the table does not depend on which image finished first."""
        base = {"image": result.image, "lane": "", "status": result.status, "seconds": str(result.seconds),
                "outputs": ";".join(result.outputs), "error": result.error, "input": result.input,
                **result.text.columns}
        new = [{**base, "lane": lane, **metrics} for lane, metrics in result.text.lanes.items()] or [base]
        for row in new:
            self.columns += [c for c in row if c not in self.columns]
        self.rows = {k: v for k, v in self.rows.items() if k[0] != result.image}
        self.rows.update({(r["image"], r["lane"]): r for r in new})
        tmp = self.path.with_name(f".results.csv.{os.getpid()}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            for key in sorted(self.rows):  # any completion order
                w.writerow([self.rows[key].get(c, "") for c in self.columns])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
