"""What a finished run said in text, sorted for ``results.csv``: short values, metrics per lane, reports.

A results table is for numbers and short labels. So:

* a one-line STRING output or UI text is a column ``"<title>.<output name>"`` /
  ``"<title>.text"`` (a title shared by several nodes gets ``" #<id>"``);
* each node that reports ``metrics`` in its UI result (AntiPure Evaluate) is a
  *lane*, named by its ``label`` input (else its title): one table row per image
  and lane, one column per metric;
* multi-line text (a markdown report) is a file next to the image's outputs,
  ``<image stem>/<title>.md``, written once even when a viewer node shows it again.

Plain Python: no ComfyUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .prompts import title

__all__ = ["TextOutputs", "collect_text"]


@dataclass
class TextOutputs:
    columns: dict[str, str] = field(default_factory=dict)          # one-line values, per image
    lanes: dict[str, dict[str, str]] = field(default_factory=dict)  # lane -> metric -> value
    reports: dict[str, str] = field(default_factory=dict)           # file name (.md) -> text

    def replace(self, old: str, new: str) -> "TextOutputs":
        """The same text with ``old`` replaced by ``new`` everywhere (a staging folder in a path)."""
        sub = lambda d: {k: v.replace(old, new) for k, v in d.items()}  # noqa: E731
        return TextOutputs(sub(self.columns), {k: sub(v) for k, v in self.lanes.items()}, sub(self.reports))


def _file_name(label: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", label).strip("._") or "report"


def collect_text(prompt: Mapping[str, dict], node_classes: Mapping[str, Any],
                 outputs: Mapping[str, Any], ui: Mapping[str, Any]) -> TextOutputs:
    """Sort the STRING outputs and UI text of a finished run (node order, then output order).

    Args:
        outputs: node id -> its output values, one list (a batch of values) per output slot.
        ui: node id -> its UI result (a dict with optional ``text`` and ``metrics`` lists).
    """
    found = TextOutputs()
    seen_reports: set[str] = set()

    def add(name: str, text: str) -> None:
        if "\n" not in text.strip():
            found.columns.setdefault(name, text)
        elif text not in seen_reports:
            seen_reports.add(text)
            found.reports[_file_name(name.rsplit(".", 1)[0]) + ".md"] = text

    for node_id in prompt:
        cls = node_classes[prompt[node_id]["class_type"]]
        types = list(getattr(cls, "RETURN_TYPES", ()) or ())
        names = list(getattr(cls, "RETURN_NAMES", None) or types)
        data = outputs.get(node_id)
        label = title(prompt, node_id)
        if sum(title(prompt, other) == label for other in prompt) > 1:
            label = f"{label} #{node_id}"
        for i, type_ in enumerate(types):
            if type_ == "STRING" and data is not None and i < len(data) and data[i] is not None:
                values = [v for v in data[i] if isinstance(v, str)]
                if values:
                    add(f"{label}.{names[i]}", "\n".join(values))
        shown = ui.get(node_id) or {}
        texts = shown.get("text")
        if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
            add(f"{label}.text", "\n".join(texts))
        for metrics in shown.get("metrics") or ():
            if isinstance(metrics, Mapping):
                lane = prompt[node_id]["inputs"].get("label")
                lane = lane if isinstance(lane, str) and lane.strip() else label
                found.lanes.setdefault(lane, {}).update({k: str(v) for k, v in metrics.items()})
    return found
