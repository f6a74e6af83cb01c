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
                               "methods": ("none", "sds", "advdm", "antipure-pfg50", "oracle"),
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
