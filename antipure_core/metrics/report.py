"""Collect metric results into rows, render a markdown table, and append rows to JSON / CSV files.

A *row* is a flat ``dict[str, float | str]`` (metric name -> number, or a
``"not available: ..."`` / ``"n/a: ..."`` string). Runs are grouped by a
*label*: every run appended with the same label joins that label's table.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Mapping


def format_value(v) -> str:
    """Numbers with 4 significant digits (``inf`` as ``inf``), strings as they are."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if math.isinf(v) or math.isnan(v):
        return str(v)
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def markdown_table(rows: Mapping[str, Mapping] | list[Mapping], label_column: str = "label") -> str:
    """Render rows as a GitHub markdown table, one row per run, columns = union of keys in first-seen order.

    ``rows`` is either ``{label: row}`` or a list of rows (each may carry its
    own ``label`` key). Missing cells are left empty; ``|`` in strings is escaped.
    """
    if isinstance(rows, Mapping):
        rows = [{label_column: k, **v} for k, v in rows.items()]
    if not rows:
        return ""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]

    def cell(v) -> str:
        return format_value(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) if c in r else "" for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(v):
    # JSON has no inf/nan: keep them readable and round-trippable as strings
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return v


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the file gets what open() would give, like the images
    with os.fdopen(fd, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)  # a crash never leaves a half-written results file


def append_results(path_json: str | os.PathLike | None, path_csv: str | os.PathLike | None,
                   label: str, row: Mapping) -> dict[str, list[dict]]:
    """Append one run's ``row`` under ``label`` to a JSON file and a CSV file; return all tables.

    JSON layout: ``{label: [row, row, ...]}`` — runs with the same label form
    one table. The CSV holds every run of every label with a leading ``label``
    column; its header grows when a run brings new metrics (the file is
    rewritten, older rows get empty cells). Either path may be ``None``.
    ``inf``/``nan`` are stored as the strings ``"inf"``/``"nan"``.

    Raises:
        ValueError: ``label`` is empty, or an existing JSON file is not such a mapping.
    """
    if not isinstance(label, str) or not label.strip():
        raise ValueError("label: must be a non-empty string naming the run group, e.g. 'antipure eta=8'")
    row = {k: _jsonable(v) for k, v in row.items() if k != "label"}
    tables: dict[str, list[dict]] = {label: []}
    if path_json is not None:
        pj = Path(path_json)
        if pj.is_file() and pj.stat().st_size:
            tables = json.loads(pj.read_text())
            if not isinstance(tables, dict) or not all(isinstance(v, list) for v in tables.values()):
                raise ValueError(f"path_json: {pj} is not a {{label: [rows]}} results file")
            tables.setdefault(label, [])
    tables[label].append(row)
    if path_json is not None:
        _atomic_write(Path(path_json), json.dumps(tables, indent=1))
    if path_csv is not None:
        pc = Path(path_csv)
        old: list[dict] = []
        columns = ["label"]
        if pc.is_file() and pc.stat().st_size:
            with open(pc, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or ["label"])
                old = list(reader)
        columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old)
        writer.writerow({"label": label, **row})
        _atomic_write(pc, buf.getvalue())
    return tables


def tables_markdown(tables: Mapping[str, list[Mapping]]) -> str:
    """One markdown table per label (as returned by :func:`append_results`), each under a ``### label`` heading."""
    return "\n\n".join(f"### {label}\n\n{markdown_table(rows)}" for label, rows in tables.items() if rows)
