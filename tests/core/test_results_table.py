"""results.csv: one row per image (and lane), one column per metric, reports as files (antipure.results)."""
from __future__ import annotations

import csv

from antipure.results import ImageResult, ResultsTable, Staging
from antipure.text_outputs import TextOutputs, collect_text

REPORT = "## AntiPure evaluation: a\n\n| metric | value |\n|---|---|\n| protected/psnr | 40 |"


class _Node:
    def __init__(self, returns=(), names=None):
        self.RETURN_TYPES, self.RETURN_NAMES = tuple(returns), names


CLASSES = {"Evaluate": _Node(["STRING", "IMAGE"], ["report", "plot"]), "PreviewAny": _Node(),
           "Label": _Node(["STRING"])}


def _prompt():
    return {"1": {"class_type": "Evaluate", "inputs": {"label": "antipure+jpeg"}, "_meta": {"title": "JPEG scores"}},
            "2": {"class_type": "Evaluate", "inputs": {"label": ["9", 0]}, "_meta": {"title": "Blur scores"}},
            "3": {"class_type": "PreviewAny", "inputs": {}, "_meta": {"title": "JPEG report"}},
            "4": {"class_type": "Label", "inputs": {}, "_meta": {"title": "Tag"}}}


def test_text_is_sorted_into_columns_lanes_and_report_files():
    outputs = {"1": [[REPORT], None], "2": [[REPORT.replace(": a", ": b")], None], "4": [["v1"]]}
    ui = {"1": {"text": [REPORT], "metrics": [{"protected/psnr": 40.0}]},
          "2": {"metrics": [{"protected/psnr": "not available: x"}]}, "3": {"text": [REPORT]}}
    text = collect_text(_prompt(), CLASSES, outputs, ui)
    assert text.columns == {"Tag.STRING": "v1"}  # no markdown in a cell
    # a lane per scoring node, named by its label (a wired label: the node's title)
    assert text.lanes == {"antipure+jpeg": {"protected/psnr": "40.0"},
                          "Blur scores": {"protected/psnr": "not available: x"}}
    assert text.reports == {"JPEG_scores.md": REPORT, "Blur_scores.md": REPORT.replace(": a", ": b")}  # once each


def test_one_row_per_image_and_lane_and_resume_keeps_whole_images(tmp_path):
    table = ResultsTable(tmp_path)
    lanes = {"jpeg": {"psnr": "30"}, "blur": {"psnr": "31", "ssim": "0.9"}}
    table.add(ImageResult("b.png", text=TextOutputs({"Tag.STRING": "x"}, lanes)))
    table.add(ImageResult("a.png", text=TextOutputs({}, {"jpeg": {"psnr": "29"}})))
    table.add(ImageResult("c.png", status="invalid", error="c.png: empty file"))
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["lane"], r["psnr"]) for r in rows] == [
        ("a.png", "jpeg", "29"), ("b.png", "blur", "31"), ("b.png", "jpeg", "30"), ("c.png", "", "")]
    assert rows[1]["ssim"] == "0.9" and rows[1]["Tag.STRING"] == "x" and rows[0]["Tag.STRING"] == ""
    resumed = ResultsTable(tmp_path, resume=True)
    assert resumed.finished() == {"a.png", "b.png"}
    resumed.add(ImageResult("b.png", text=TextOutputs({}, {"jpeg": {"psnr": "1"}})))  # redone: old rows go
    with open(tmp_path / "results.csv", newline="") as f:
        assert [(r["image"], r["lane"], r["psnr"]) for r in csv.DictReader(f)] == [("a.png", "jpeg", "29"),
                                                                                    ("b.png", "jpeg", "1")]


def test_reports_name_the_committed_files_and_are_written_next_to_the_outputs(tmp_path):
    staging = Staging(tmp_path, "face")
    named = TextOutputs(reports={"r.md": f"Appended to `.partial/{staging.token}/face/antipure/r.json`."})
    text = staging.published(named)
    assert text.reports["r.md"] == "Appended to `face/antipure/r.json`."
    files = staging.commit(staging.write_reports(text.reports))
    assert files == ["face/r.md"] and (tmp_path / "face" / "r.md").read_text() == text.reports["r.md"] + "\n"


def test_a_killed_runs_leftovers_are_cleared_and_finished_images_kept(tmp_path):
    first = ResultsTable(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "out_00001_.png").write_bytes(b"whole")
    first.add(ImageResult("a.png", outputs=["a/out_00001_.png"]))
    # killed while b's files were being renamed into place, and while the table was rewritten
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "out_00001_.png").write_bytes(b"half")
    (tmp_path / ".partial" / "tok" / "b").mkdir(parents=True)
    (tmp_path / ".results.csv.123.tmp").write_text("image,lane\n")
    table = ResultsTable(tmp_path, resume=True)
    table.clear_unfinished(["a", "b"])
    assert table.finished() == {"a.png"}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "a", "a/out_00001_.png", "results.csv"]
