"""experiments/two_fold.py on the tiny dataset: each half trained once, the other half scored
unseen at the run's own threshold, the table made from the recorded folds."""

import json
import sys

import numpy as np
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))


def test_two_folds_score_the_unseen_half_and_resume_from_the_record(
    tmp_path, prepared, monkeypatch
):
    import two_fold

    from common import load_rows, read_manifest
    from model import load_checkpoint, predict

    halves = {
        "a": {"real": ["camera"], "fake": ["ganA"]},
        "b": {"real": ["people"], "fake": ["ganB"]},
    }
    monkeypatch.setattr(two_fold, "FOLDS", halves)
    results, runs = tmp_path / "yardstick", tmp_path / "runs"
    argv = ["--name", "tiny", "--data", str(prepared), "--epochs", "1", "--runs", str(runs),
            "--results", str(results), "--", "--batch-size", "16", "--workers", "0"]  # fmt: skip
    two_fold.main(argv)
    record = json.loads((results / "tiny.json").read_text())
    assert record["train_args"] == ["--batch-size", "16", "--workers", "0"]
    assert set(record["folds"]) == {"a", "b"}

    rows = read_manifest(prepared)
    for fold, other in (("a", "b"), ("b", "a")):
        # The training half's manifest holds its own sources only.
        subset = read_manifest(prepared.parent / f"{prepared.name}-fold-{fold}")
        assert {r["source"] for r in subset} == set(sum(halves[fold].values(), []))
        # Recompute one unseen source's accuracy independently, at the run's threshold.
        model, ckpt = load_checkpoint(runs / "tiny" / f"train-on-{fold}" / "best.pt")
        result = record["folds"][fold]
        real = halves[other]["real"][0]
        unseen = [r for r in rows if r["source"] == real]
        prob = predict(model, load_rows(unseen), torch.device("cpu"))[0].numpy()
        assert result["unseen_per_source"][real]["n"] == len(unseen)
        assert np.isclose(
            result["unseen_per_source"][real]["accuracy"], (prob < ckpt["threshold"]).mean()
        )
        assert result["unseen_real_accuracy"] == result["unseen_per_source"][real]["accuracy"]
        assert 0 <= result["unseen_auc"] <= 1 and result["ort_ms_batch1"] > 0
        assert result["unseen_demographic_gap"] is None  # no labelled source in the tiny data

    # A second call trains nothing: both folds are recorded; the table has the candidate's row.
    monkeypatch.setattr(two_fold, "train_fold", lambda *a: (_ for _ in ()).throw(AssertionError))
    two_fold.main(argv)
    table = (tmp_path / "yardstick.md").read_text()
    assert "| tiny | `--batch-size 16 --workers 0` | ab |" in table
    # Other flags under the same name are refused rather than mixed into one row.
    try:
        two_fold.main(argv[:-1])
    except SystemExit as exc:
        assert "other flags" in str(exc)
    else:
        raise AssertionError("a changed recipe under the same name was accepted")


def test_folds_run_side_by_side_keep_each_others_records(tmp_path):
    """`--folds a` and `--folds b` in two calls: each loaded the file before the other wrote
    it, and the second to finish must not drop the first's fold."""
    import two_fold

    path = tmp_path / "x.json"
    two_fold.save(path, {"name": "x", "folds": {"a": {"unseen_auc": 0.7}}})  # call 1 finishes
    two_fold.save(path, {"name": "x", "folds": {"b": {"unseen_auc": 0.6}}})  # call 2, loaded empty
    folds = json.loads(path.read_text())["folds"]
    assert folds == {"a": {"unseen_auc": 0.7}, "b": {"unseen_auc": 0.6}}
    # A fold measured again by this call replaces its own older record.
    two_fold.save(path, {"name": "x", "folds": {"b": {"unseen_auc": 0.65}}})
    assert json.loads(path.read_text())["folds"]["b"] == {"unseen_auc": 0.65}


def test_spectrum_features_see_upsampling_and_the_baseline_scores_both_folds(
    tmp_path, prepared, monkeypatch
):
    import spectrum
    import two_fold

    from common import load_rows, read_manifest

    # An image upsampled 2x (nearest) keeps half the band: its outer rings fall well below
    # those of the same noise at full resolution; a constant offset leaves the profile as is.
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, (1, 3, 128, 128), dtype=np.uint8))
    upsampled = noise[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3)
    sharp, soft = spectrum.radial_profile(spectrum.log_power(torch.cat([noise, upsampled])))
    assert sharp.shape == (spectrum.RINGS,) and abs(sharp.mean()) < 1e-4
    assert soft[-8:].mean() < sharp[-8:].mean() - 1.5
    # Neither brightness nor contrast moves a feature: the same pattern brighter, or doubled.
    half = (noise.int() // 2).to(torch.uint8)
    brighter, doubled = (half + 60).to(torch.uint8), (half.int() * 2).to(torch.uint8)
    power = spectrum.log_power(torch.cat([half, brighter, doubled]))
    for features in (spectrum.radial_profile(power), spectrum.pooled_grid(power)):
        assert np.allclose(features[0], features[1], atol=1e-3)
        assert np.allclose(features[0], features[2], atol=1e-3)
    assert spectrum.pooled_grid(spectrum.log_power(noise)).shape == (1, spectrum.GRID**2)

    halves = {
        "a": {"real": ["camera"], "fake": ["ganA"]},
        "b": {"real": ["people"], "fake": ["ganB"]},
    }
    monkeypatch.setattr(spectrum, "FOLDS", halves)
    monkeypatch.setattr(two_fold, "FOLDS", halves)
    results = tmp_path / "yardstick"
    spectrum.main(["--data", str(prepared), "--features", "radial",
                   "--cache", str(tmp_path / "features.npz"), "--results", str(results)])  # fmt: skip
    record = json.loads((results / "spectrum-radial.json").read_text())
    assert set(record["folds"]) == {"a", "b"}
    rows = read_manifest(prepared)
    rings = min(spectrum.RINGS, load_rows(rows[:1]).shape[-1] // 2)
    for fold, other in (("a", "b"), ("b", "a")):
        result = record["folds"][fold]
        real = halves[other]["real"][0]
        assert result["unseen_per_source"][real]["n"] == sum(r["source"] == real for r in rows)
        assert 0 <= result["unseen_auc"] <= 1 and result["params"] == rings + 1
    two_fold.write_table(results)
    assert "| spectrum-radial | `(not train.py" in (tmp_path / "yardstick.md").read_text()
