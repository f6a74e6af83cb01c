"""Testbed v3: its units, one unit end to end on the committed models (a few steps), the report, bad input."""
from dataclasses import replace

import pytest
import torch

from benchmarks.testbed import v3
from benchmarks.testbed.experiment import Settings
from benchmarks.testbed.train import MODELS_DIR
from benchmarks.testbed.v3_report import write_report

pytestmark = pytest.mark.usefixtures("one_thread")


def test_units_are_ten_distinct_crops_with_their_own_clean_set():
    s = Settings()
    assert len(v3.UNITS) >= 10 and len(set(v3.UNITS)) == len(v3.UNITS)
    seen = []
    for u in range(len(v3.UNITS)):
        photos, set_a = v3.unit_views(u, s)
        assert photos.shape == set_a.shape == (s.num_photos, 3, 64, 64)
        assert all(not torch.equal(p, a) for p in photos for a in set_a)
        assert all(not torch.equal(photos, other) for other in seen)
        seen.append(photos)
    assert len({v3.unit_seed(s, u) for u in range(len(v3.UNITS))}) == len(v3.UNITS)


def test_one_unit_end_to_end_and_its_report(tmp_path):
    s = replace(Settings(), **{**v3.V3_SETTINGS, **v3.QUICK, "num_photos": 2,
                               "methods": ("none", "sds", "advdm", "antipure-pfg50", "oracle",
                                           "purified_advdm-one_step"),
                               "purifiers": ("none", "gridpure", "jpeg", "gridpure-unknown")})
    rec = v3.run_unit(7, s, MODELS_DIR, None, log=lambda *_: None)
    cells = {(r["method"], r["purifier"]) for r in rec["rows"]}
    # the unknown purifier runs on UNKNOWN_METHODS only; the others on every method
    for m in s.methods:
        for col in ("none", "gridpure", "jpeg"):
            assert (m, col) in cells
        assert ((m, "gridpure-unknown") in cells) == (m in v3.UNKNOWN_METHODS)
    row = {(r["method"], r["purifier"]): r for r in rec["rows"]}
    # common random numbers: the clean photos' purification is 'none', so its survival is exactly 0
    assert row[("none", "gridpure")]["survival"] == 0 and row[("none", "gridpure")]["sample_gain"] == 0
    assert row[("advdm", "none")]["perturbation_rmse"] > 0
    assert {"brisque_generated", "brisque_gain", "subject_drop"} <= set(row[("oracle", "jpeg")])
    assert set(rec["calibration"]) == {"gridpure", "gridpure@2", "jpeg", "gridpure-unknown"}
    # each method's own loss terms on the clean and the protected photos; AntiPure's gradient shares
    assert {"ldm_clean", "ldm_protected", "pfg_clean", "etg_protected"} <= set(rec["terms"]["antipure-pfg50"])
    assert rec["terms"]["none"] == {} and "objective_clean" in rec["terms"]["oracle"]
    shares = rec["shares"]["antipure-pfg50"]
    assert sum(shares[f"{k}_share"] for k in ("ldm", "pfg", "etg")) == pytest.approx(1)
    assert shares["pfg_lambda"] > 0
    paths = write_report(tmp_path, "t", [rec, {**rec, "unit": 8, "seed": rec["seed"] + 1,
                                               "rows": [{**r, "subject": 8} for r in rec["rows"]]}], s,
                         {"command": "test", "wall_s": 1, "machine": "test", "vae_heldout_db": 0, "unknown": "seed-1",
                          "calibration": {}})
    text = paths[0].read_text()
    for want in ("### gridpure-unknown", "Against the best baseline under gridpure", "antipure-pfg50",
                 "survival after GrIDPure 2 × 20 (1/255), minus AdvDM's",
                 "Each method's own objective", "Survival over GrIDPure iterations"):
        assert want in text, want
    assert paths[1].read_text().count("\n") == 1 + 2 * len(rec["rows"])


def test_purifier_weights_must_be_the_unknown_purifiers_architecture(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(SystemExit, match="--purifier-weights: .* is not an ADM"):
        v3.load_unknown(str(bad), MODELS_DIR)
    with pytest.raises(SystemExit, match="--purifier-weights: no file"):
        v3.main(["--purifier-weights", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--units: \\[99\\] out of range"):
        v3.main(["--units", "99", "--out", str(tmp_path), "--report-only"])


def _small(methods, **kw):
    return replace(Settings(), **{**v3.V3_SETTINGS, **v3.QUICK, "num_photos": 2, "methods": methods,
                                  "purifiers": ("none", "gridpure"), **kw})


def test_methods_added_to_a_stored_unit_equal_a_run_with_all_of_them():
    quiet = dict(log=lambda *_: None)
    first = v3.run_unit(7, _small(("none", "advdm")), MODELS_DIR, None, **quiet)
    added = v3.run_unit(7, _small(("none", "advdm", "random")), MODELS_DIR, None, previous=first, **quiet)
    whole = v3.run_unit(7, _small(("none", "random", "advdm")), MODELS_DIR, None, **quiet)
    key = lambda r: (r["method"], r["purifier"])  # noqa: E731
    cells = lambda rec: sorted(({k: v for k, v in r.items() if k != "protect_s"} for r in rec["rows"]),  # noqa: E731
                               key=key)  # protect_s is a wall time
    assert cells(added) == cells(whole)  # paired bit for bit
    assert [r["method"] for r in added["rows"]] == ["none"] * 3 + ["random"] * 3 + ["advdm"] * 3  # V3 order
    assert added["terms"] == whole["terms"] and set(added["objectives"]) == {"none", "advdm", "random"}
    assert v3.run_unit(7, _small(("none", "advdm")), MODELS_DIR, None, previous=first, **quiet) is first
    # a stored unit this machine does not reproduce is not merged into
    tampered = {**first, "rows": [{**r, "sample_dist": r["sample_dist"] + 0.01}
                                  if (r["method"], r["purifier"]) == ("none", "gridpure") else r
                                  for r in first["rows"]]}
    with pytest.raises(RuntimeError, match="does not reproduce the stored units"):
        v3.merge_units(tampered, added)


def test_bad_methods_and_eta_name_the_option(tmp_path):
    with pytest.raises(SystemExit, match="--methods: \\['nope'\\] not in testbed v3"):
        v3.main(["--methods", "advdm", "nope", "--out", str(tmp_path), "--report-only"])
    with pytest.raises(SystemExit, match="--eta: a budget in 1/255"):
        v3.main(["--eta", "0", "--out", str(tmp_path), "--report-only"])


def test_why_purified_on_one_unit(tmp_path):
    from benchmarks.testbed import purified_why as why

    s = _small(v3.V3_METHODS)
    rec = why.why_unit(7, s, MODELS_DIR, log=lambda *_: None)
    assert set(rec["gradients"]) == set(why.PURIFIED) == set(rec["own_term"]) == set(rec["delta_vs_advdm"])
    for route in why.PURIFIED:
        for tag in ("clean", "protected"):
            g = rec["gradients"][route][tag]
            assert 0 < g["purified_share"] < 1 and -1 <= g["cosine"] <= 1
        assert rec["delta_vs_advdm"][route]["rmse"] > 0
        assert rec["own_term"][route][route] > rec["own_term"][route]["none"]  # the attack raises its own term
    assert list(rec["ldm_after"]) == ["0", "1", "2"]  # QUICK's 2 iterations
    assert rec["ldm_after"]["0"]["none"] < rec["ldm_after"]["0"]["advdm"]
    rec["cpu_s"] = 1.0
    text = why.report([rec, {**rec, "unit": 8}], s, {"command": "t", "wall_s": 1, "machine": "t", "reproduced": "0"})
    for want in ("## 1.", "## 2.", "## 3.", "purified_advdm-k_step − AdvDM"):
        assert want in text, want
