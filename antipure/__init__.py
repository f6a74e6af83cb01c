"""Headless tools of the AntiPure pack: ``python -m antipure run WORKFLOW --images DIR --out DIR``.

* :mod:`antipure.comfyui`: find ComfyUI, boot it in-process, load this pack.
* :mod:`antipure.workflow_format`: UI-format workflow JSON -> API prompt.
* :mod:`antipure.prompts`: ``--set`` overrides, image inputs, model and validation checks.
* :mod:`antipure.batch`: one workflow over a folder on the in-process executor.
* :mod:`antipure.scheduler` + :mod:`antipure.remote`: the same, sharded over running ComfyUI servers.
* :mod:`antipure.results`: ``results.csv`` and atomic, resumable per-image outputs.
* :mod:`antipure.cli`: the command line; :mod:`antipure.demo`: the plumbing demo.

Nothing here imports ComfyUI at import time.
"""

from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
