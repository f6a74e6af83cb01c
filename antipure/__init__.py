"""Command-line tools of the AntiPure pack: ``python -m antipure run WORKFLOW --images DIR --out DIR``.

The tools live in the pack's ``nodes/`` folder next to the node code, but that
folder cannot be imported as ``nodes`` here: the host's own ``nodes.py`` must
win that name. So this package adds ``nodes/`` to its own search path and the
tools import as ``antipure.runner`` and ``antipure.workflow_format`` without
running ``nodes/__init__.py`` (which needs a booted host).
"""

from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]

__path__.append(str(PACK_ROOT / "nodes"))  # noqa: F821 - package __path__
