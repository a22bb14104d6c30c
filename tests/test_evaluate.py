"""evaluate.py: metrics on hand-made predictions, perturbations, the per-source table, the
shortcut audits (who is called fake: demographics.py; face size and sharpness), one
evaluation of a tiny run, and one-line errors on bad input (comparisons of runs:
test_experiments.py)."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import calibrate
import common
import demographics
import evaluate


# ---------------------------------------------------------------- pure functions
def test_metrics_on_hand_made_predictions():
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    prob = [0.1, 0.2, 0.6, 0.3, 0.8, 0.4, 0.9, 0.7]
    m = evaluate.compute_metrics(labels, prob, threshold=0.5)
    # One false positive (0.6), one false negative (0.4).
    assert m["confusion_matrix"]["matrix"] == [[3, 1], [1, 3]]
    assert m["confusion_matrix"]["labels"] == ["real", "fake"]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    for name in ("real", "fake"):
        c = m["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (0.75, 0.75, 0.75, 4)
        )
    assert m["macro"]["f1"] == pytest.approx(0.75)
    # 15 of the 16 (fake, real) pairs are ranked right: only 0.4 < 0.6.
    assert m["roc_auc"] == pytest.approx(15 / 16)
    # Ranked: P P P N P ... -> AP = (1 + 1 + 1 + 4/5) / 4.
    assert m["average_precision"] == pytest.approx(0.95)
    # No false positive is allowed below 12.5 % FPR: the three top fakes only.
    assert m["tpr_at_fpr_1pct"] == pytest.approx(0.75)
    assert m["tpr_at_fpr_5pct"] == pytest.approx(0.75)
    assert m["threshold"] == 0.5 and m["accuracy_at_0.5"] == pytest.approx(0.75)
    # The threshold in use moves the decisions, not the ranking metrics.
    lower = evaluate.compute_metrics(labels, prob, threshold=0.35)
    assert lower["accuracy"] == pytest.approx(7 / 8) and lower["accuracy_at_0.5"] == pytest.approx(
        0.75
    )
    assert lower["roc_auc"] == m["roc_auc"]


def test_calibration_table_against_hand_values_and_sklearn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    labels = [0, 0, 0, 1, 0, 1, 1, 1, 1, 0]
    prob = [0.05, 0.05, 0.15, 0.15, 0.55, 0.55, 0.95, 0.95, 1.0, 0.95]
    m = evaluate.compute_metrics(labels, prob, threshold=0.5)
    bins = m["calibration"]["bins"]
    # Empty bins are left out; prob 1.0 falls in the last bin, not an eleventh one.
    assert [(b["low"], b["n"]) for b in bins] == [(0.0, 2), (0.1, 2), (0.5, 2), (0.9, 4)]
    assert [b["fraction_fake"] for b in bins] == pytest.approx([0, 0.5, 0.5, 0.75])
    frac, mean = calibration_curve(labels, prob, n_bins=10)
    assert [b["fraction_fake"] for b in bins] == pytest.approx(frac)
    assert [b["mean_prob_fake"] for b in bins] == pytest.approx(mean)
    # ECE: (2 * 0.05 + 2 * 0.35 + 2 * 0.05 + 4 * |0.9625 - 0.75|) / 10.
    expected = (0.1 + 0.7 + 0.1 + 4 * 0.2125) / 10
    assert m["calibration"]["expected_calibration_error"] == pytest.approx(expected)
    assert m["brier"] == pytest.approx(brier_score_loss(labels, prob))
    # A perfectly sure, perfectly right model: Brier 0, ECE 0.
    sure = evaluate.compute_metrics([0, 1], [0.0, 1.0], threshold=0.5)
    assert sure["brier"] == 0 and sure["calibration"]["expected_calibration_error"] == 0


def test_metrics_imbalanced_and_one_class():
    labels = [0, 0, 0, 0, 0, 0, 1, 1]
    prob = [0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.1]
    m = evaluate.compute_metrics(labels, prob, threshold=0.5)
    assert m["confusion_matrix"]["matrix"] == [[5, 1], [1, 1]]
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert m["per_class"]["fake"]["precision"] == pytest.approx(0.5)
    # A split with one class: decisions are scored, ranking metrics are undefined (None).
    one = evaluate.compute_metrics([0, 0, 0], [0.1, 0.7, 0.2], threshold=0.5)
    assert one["accuracy"] == pytest.approx(2 / 3) and one["roc_auc"] is None
    json.dumps(one)  # JSON-ready


def test_perturbations_keep_shape_dtype_and_change_pixels():
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(40, 200, 32).view(1, 1, 1, 32).expand(4, 3, 32, 32)
    images = (smooth + torch.randint(-30, 30, (4, 3, 32, 32), generator=g)).clamp(0, 255)
    images = images.to(torch.uint8)
    diffs = {}
    for name, fn in common.PERTURBATIONS.items():
        out = fn(images)
        assert out.shape == images.shape and out.dtype == torch.uint8, name
        diffs[name] = (out.float() - images.float()).abs().mean().item()
        assert diffs[name] > 0.5, name
    assert diffs["jpeg50"] > diffs["jpeg95"]  # lower quality, larger change
    assert set(common.PERTURBATIONS) == {
        "jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur1", "zoom1.2", "zoom1.5"
    }  # fmt: skip


def test_zoom_enlarges_the_centre():
    # A centred bright square of half the side fills 1.5x more of the frame after zoom1.5.
    images = torch.zeros(1, 3, 60, 60, dtype=torch.uint8)
    images[..., 15:45, 15:45] = 255
    out = common.zoom(images, factor=1.5)
    bright = (out[0, 0] > 127).float().mean().item()
    assert abs(bright - 0.25 * 1.5**2) < 0.03


def test_per_source_table_adds_up():
    rows = [{"source": s, "label": lab} for s, lab in
            [("ffhq", "real")] * 3 + [("lfw", "real")] * 2 + [("gan", "fake")] * 4]  # fmt: skip
    prob = [0.1, 0.2, 0.9, 0.3, 0.4, 0.8, 0.7, 0.6, 0.2]
    table = evaluate.per_source_table(rows, prob, threshold=0.5)
    assert [t["source"] for t in table] == ["ffhq", "lfw", "gan"]  # real sources first
    assert sum(t["n"] for t in table) == len(rows)
    ffhq, lfw, gan = table
    assert ffhq["accuracy"] == pytest.approx(2 / 3) and lfw["accuracy"] == 1.0
    assert gan["accuracy"] == pytest.approx(0.75)
    assert gan["mean_prob_fake"] == pytest.approx((0.8 + 0.7 + 0.6 + 0.2) / 4)


def test_decisions_count_unsure_and_confident_errors_by_hand():
    # band 0.3-0.8 around threshold 0.5: real below 0.3, fake from 0.8, unsure between.
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    prob = [0.1, 0.2, 0.5, 0.9, 0.95, 0.85, 0.4, 0.05]
    d = evaluate.decisions(labels, prob, 0.5, (0.3, 0.8))
    assert d["unsure_share"] == pytest.approx(2 / 8)
    assert d["confident_accuracy"] == pytest.approx(4 / 6)  # 2 reals, 2 fakes right; 2 wrong
    assert d["real_called_fake_confidently"] == pytest.approx(1 / 4)
    assert d["fake_called_real_confidently"] == pytest.approx(1 / 4)
    assert d["per_class"]["real"] == {"real": 0.5, "unsure": 0.25, "fake": 0.25}
    assert evaluate.decisions(labels, prob, 0.5, None) is None  # no band, no decisions
    nobody_sure = evaluate.decisions([0, 1], [0.5, 0.6], 0.5, (0.3, 0.8))
    assert nobody_sure["unsure_share"] == 1 and nobody_sure["confident_accuracy"] is None
    rows = [{"source": s, "label": lab} for s, lab in [("a", "real")] * 4 + [("b", "fake")] * 4]
    table = evaluate.per_source_table(rows, prob, 0.5, band=(0.3, 0.8))
    assert [(t["unsure"], t["confidently_wrong"]) for t in table] == [(0.25, 0.25), (0.25, 0.25)]
    assert "unsure" not in evaluate.per_source_table(rows, prob, 0.5)[0]


def test_pick_examples_mixes_classes_deterministically():
    labels = [0] * 10 + [1] * 5
    idx = evaluate.pick_examples(labels, 6)
    assert idx == evaluate.pick_examples(labels, 6) and len(set(idx)) == 6
    assert [labels[i] for i in idx] == [0, 1, 0, 1, 0, 1]
    assert len(evaluate.pick_examples([0, 0, 1], 8)) == 3  # never more than there are


# ---------------------------------------------------------------- shortcut audits
def test_demographic_labels_from_file_names():
    labels = demographics.demographic_labels
    # UTKFace: age_gender_race_date; the path before the name does not matter.
    assert labels("utkface", "/raw/real/utkface/26_1_3_20170119.jpg") == {
        "race": "Indian", "gender": "female", "age": "20-39"
    }  # fmt: skip
    assert labels("utkface", "12_0_0_2017.jpg")["age"] == "0-12"
    assert labels("utkface", "13_0_1_2017.jpg") == {
        "race": "Black",
        "gender": "male",
        "age": "13-19",
    }
    assert labels("utkface", "60_1_4_2017.jpg")["age"] == "60+"
    assert labels("utkface", "59_1_2_2017.jpg")["age"] == "40-59"
    assert labels("utkface", "39_1_20170116174525125.jpg") == {}  # race missing: no guess
    # All-Age-Faces: serial + age; serials below 07381 are women.
    assert labels("allagefaces", "x/07380A02.jpg") == {"gender": "female", "age": "0-12"}
    assert labels("allagefaces", "07381A45.jpg") == {"gender": "male", "age": "40-59"}
    # Only the sources whose names carry labels: the same pattern elsewhere means nothing.
    assert labels("lfw", "26_1_3_20170119.jpg") == {} and labels("ffhq", "07381A45.jpg") == {}


def test_called_real_by_group_on_hand_made_rows():
    def row(source, original, label="real"):
        return {"source": source, "original": original, "label": label}

    # 20 White women (utkface, age 30): 15 called real; 20 Black men (age 30): all called real;
    # 3 Asian women (age 70), called fake: too few for the gap; allagefaces women (age 5) and
    # fakes and unlabelled reals, which must not count.
    rows = [row("utkface", f"30_1_0_{i}.jpg") for i in range(20)]
    rows += [row("utkface", f"30_0_1_{i}.jpg") for i in range(20)]
    rows += [row("utkface", f"70_1_2_{i}.jpg") for i in range(3)]
    rows += [row("allagefaces", f"{i:05d}A05.jpg") for i in range(20)]
    rows += [row("lfw", "a.jpg"), row("ganA", "30_1_0_9.jpg", "fake")]
    prob = [0.2] * 15 + [0.9] * 5 + [0.1] * 20 + [0.95] * 3 + [0.3] * 10 + [0.6] * 10 + [0.99, 0.0]
    d = demographics.called_real_by_group(rows, prob, threshold=0.5, band=[0.25, 0.8], min_n=20)
    got = {(g["attribute"], g["group"]): g for g in d["groups"]}
    assert d["n_labelled"] == 63
    assert got["race", "White"]["called_real"] == pytest.approx(0.75)
    assert got["race", "White"]["called_fake_confidently"] == pytest.approx(0.25)  # 0.9 >= 0.8
    assert got["race", "Black"]["called_real"] == 1.0 and got["race", "Asian"]["n"] == 3
    races = [g for g in d["groups"] if g["attribute"] == "race"]
    assert all(g["sources"] == {"utkface": g["n"]} for g in races)  # only UTKFace says race
    # Gender pools both sources: 20 + 3 utkface women and 20 allagefaces women.
    women = got["gender", "female"]
    assert women["sources"] == {"allagefaces": 20, "utkface": 23}
    assert women["called_real"] == pytest.approx((15 + 10) / 43)
    # 0.6 is above the threshold but inside the band: called fake, not confidently.
    assert got["age", "0-12"]["called_fake_confidently"] == 0.0
    assert [value for attribute, value in got if attribute == "age"] == ["0-12", "20-39", "60+"]
    # The gap: best minus worst over groups of >= 20, the 3 Asian faces (0 called real) left out.
    assert d["gap"]["gap"] == pytest.approx(1.0 - 0.5)
    assert d["gap"]["best"] in {"race Black", "gender male"} and d["gap"]["worst"] == "age 0-12"
    assert "race Asian" not in d["gap"]["over"] and "age 60+" not in d["gap"]["over"]
    assert d["gap_per_attribute"]["race"] == pytest.approx(0.25)
    # A smaller minimum lets the 3 Asian faces make the gap; no band, no confident share.
    small = demographics.called_real_by_group(rows, prob, 0.5, min_n=3)
    assert small["gap"]["worst"] in {"race Asian", "age 60+"} and small["gap"]["gap"] == 1.0
    assert "called_fake_confidently" not in small["groups"][0]
    assert demographics.called_real_by_group(rows[-2:], prob[-2:], 0.5) is None
    # How sure: White 15 of 20 called real has the Wilson interval 0.531-0.888; the gap of
    # 0.5 (age 0-12: 10 of 20) is far beyond what shuffling the outcomes makes.
    assert got["race", "White"]["called_real_95"] == pytest.approx([0.5313, 0.8881], abs=1e-4)
    chance = d["gap"]["by_chance"]
    assert chance["p"] < 0.01 and chance["median"] < chance["p95"] < 0.5


def test_the_gap_by_chance_matches_a_gap_that_is_only_noise():
    """Every group called real at the same rate, by chance a gap of several points: the
    permutation test must not call it a difference, and a real 30-point penalty must be."""
    rng = np.random.default_rng(1)
    rows = [{"source": "utkface", "label": "real", "original": f"{20 + k % 40}_{k % 2}_{k % 5}_x.jpg"}
            for k in range(400)]  # fmt: skip
    fair = rng.random(400)
    d = demographics.called_real_by_group(rows, fair, 0.8)
    assert d["gap"]["gap"] > 0.05 and d["gap"]["by_chance"]["p"] > 0.05
    unfair = fair + np.array([0.3 if k % 5 == 2 else 0.0 for k in range(400)])  # Asian faces
    d = demographics.called_real_by_group(rows, unfair, 0.8)
    assert d["gap"]["worst"] == "race Asian" and d["gap"]["by_chance"]["p"] < 0.01


def test_sharpness_is_the_variance_of_the_laplacian():
    # One bright pixel of 9 (all channels) on black: the valid 3x3 Laplacian is -36 at it,
    # 9 at its four neighbours, 0 elsewhere: mean 0, variance (36^2 + 4 * 9^2) / 9 = 180.
    dot = torch.zeros(1, 3, 5, 5, dtype=torch.uint8)
    dot[..., 2, 2] = 9
    assert evaluate.sharpness(dot)[0] == pytest.approx(180)
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    soft = common.blur(noisy, sigma=1.5)
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    s = evaluate.sharpness(torch.cat([noisy, soft, flat]), batch_size=2)  # batches agree
    assert all(s[:3] > 10 * s[3:6]) and s[6] == 0


def test_shortcut_check_sees_a_score_that_follows_the_measure():
    # Fakes get more fake as the measure grows, reals do not follow it; the measure alone
    # separates the classes perfectly (every fake is larger than every real).
    measure = np.r_[np.arange(10, 20), np.arange(30, 40)]
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    prob = np.r_[[0.3, 0.1] * 5, np.linspace(0.2, 0.9, 10)]
    c = evaluate.shortcut_check(measure, labels, prob, threshold=0.5, n_bins=4)
    assert c["alone_roc_auc"] == 1.0 and c["spearman"]["fake"] == pytest.approx(1.0)
    assert abs(c["spearman"]["real"]) < 0.3
    assert len(c["bins"]) == 4 and c["bins"][0]["low"] == 10 and c["bins"][-1]["high"] == 39
    assert sum(b[k]["n"] for b in c["bins"] for k in ("real", "fake")) == 20
    assert c["bins"][0]["fake"]["n"] == 0 and c["bins"][0]["fake"]["mean_prob_fake"] is None
    top = c["bins"][-1]["fake"]
    assert top["n"] == 5 and top["called_fake"] == pytest.approx(np.mean(prob[15:] >= 0.5))
    # A constant measure: one bin, no correlation, chance-level separation.
    flat = evaluate.shortcut_check(np.ones(20), labels, prob, threshold=0.5)
    assert len(flat["bins"]) == 1 and flat["spearman"] == {"real": None, "fake": None}
    assert flat["alone_roc_auc"] == 0.5


# ---------------------------------------------------------------- on the tiny runs
def test_evaluate_run_writes_everything(tiny_runs, prepared, tmp_path, capsys):
    out = tmp_path / "eval"
    report = evaluate.main([
        "--checkpoint", str(tiny_runs["on"]), "--data", str(prepared), "--out", str(out),
        "--robustness", "--heatmaps", "4", "--device", "cpu", "--json", str(tmp_path / "m.json"),
    ])  # fmt: skip
    for name in ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png",
                 "per_source.png", "calibration.png", "robustness.png", "heatmaps.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left none
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads((tmp_path / "m.json").read_text())
    ckpt = torch.load(tiny_runs["on"] / "best.pt", weights_only=True)
    m = saved["metrics"]
    assert m["threshold"] == pytest.approx(ckpt["threshold"]) and saved["manifest_matches"]
    with open(prepared / "manifest.csv") as f:
        test_rows = [r for r in csv.DictReader(f) if r["split"] == "test"]
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == ["path", "source", "label", "prob_fake", "pred"]
    assert len(preds) == len(test_rows) == m["n"]
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == len(test_rows)
    # Per-source rows add up to the split, source by source.
    counts = {}
    for r in test_rows:
        counts[r["source"]] = counts.get(r["source"], 0) + 1
    assert {s["source"]: s["n"] for s in saved["per_source"]} == counts
    # predictions.csv agrees with the reported accuracy at the stored threshold.
    correct = [p["pred"] == p["label"] for p in preds]
    assert np.mean(correct) == pytest.approx(m["accuracy"])
    framings = [f"frame{f}" for f in evaluate.FRAMINGS]
    assert [r["condition"] for r in saved["robustness"]] == [
        "clean",
        *common.PERTURBATIONS,
        *framings,
    ]
    assert saved["robustness"][0]["accuracy"] == pytest.approx(m["accuracy"])
    assert len(saved["heatmaps"]) == 4
    text = capsys.readouterr().out
    assert "predicted fake" in text and "shortcut audit" in text and "jpeg50" in text
    assert "Brier score" in text
    assert sum(b["n"] for b in m["calibration"]["bins"]) == m["n"]
    assert report["metrics"] == m
    # What a user is shown (real / fake / unsure with the checkpoint's band) agrees with the
    # predictions, decided again here by calibrate.decision.
    said = [calibrate.decision(float(p["prob_fake"]), ckpt["threshold"], ckpt["unsure_band"])
            for p in preds]  # fmt: skip
    assert m["decisions"]["band"] == pytest.approx(list(ckpt["unsure_band"]))
    assert m["decisions"]["unsure_share"] == pytest.approx(np.mean([s == "unsure" for s in said]))
    assert "unsure band prob_fake" in text


def test_evaluate_audits_who_is_called_fake(tiny_runs, prepared, tmp_path, capsys):
    # The tiny set's real sources renamed as the two labelled ones, their originals given
    # labelled names: the audit must find them, count them and agree with predictions.csv.
    from common import read_manifest, write_csv

    data = tmp_path / "labelled"
    data.mkdir()
    (data / "images").symlink_to(prepared / "images")
    rows = read_manifest(prepared)
    fields = [k for k in rows[0] if k != "file"]
    for i, r in enumerate(rows):
        if r["source"] == "camera":
            r["source"], r["original"] = "utkface", f"/raw/{(i % 5) * 15 + 5}_{i % 2}_{i % 5}_1.jpg"
        elif r["source"] == "people":
            r["source"], r["original"] = (
                "allagefaces",
                f"/raw/{i * 97 % 9000:05d}A{i % 70 + 2:02d}.jpg",
            )
    write_csv(data / "manifest.csv", [{k: r[k] for k in fields} for r in rows], fields)
    out = tmp_path / "eval"
    report = evaluate.main(["--checkpoint", str(tiny_runs["off"]), "--data", str(data),
                            "--out", str(out), "--device", "cpu", "--min-group", "3"])  # fmt: skip
    for name in ("demographics.png", "size_sharpness.png"):
        assert (out / name).stat().st_size > 0, name
    d = report["metrics"]["demographics"]
    test_rows = [r for r in rows if r["split"] == "test"]
    reals = [r for r in test_rows if r["label"] == "real"]
    assert d["n_labelled"] == len(reals) and d["min_n"] == 3
    by_attribute = {}
    for g in d["groups"]:
        by_attribute[g["attribute"]] = by_attribute.get(g["attribute"], 0) + g["n"]
    n_utk = sum(r["source"] == "utkface" for r in reals)
    assert by_attribute == {"race": n_utk, "gender": len(reals), "age": len(reals)}
    with open(out / "predictions.csv") as f:
        called = {p["path"]: p["pred"] == "real" for p in csv.DictReader(f)}
    women = [r for r in reals if demographics.demographic_labels(r["source"], r["original"])
             .get("gender") == "female"]  # fmt: skip
    female = next(g for g in d["groups"] if g["group"] == "female")
    assert female["called_real"] == pytest.approx(np.mean([called[r["path"]] for r in women]))
    shares = [g["called_real"] for g in d["groups"] if g["n"] >= 3]
    assert report["metrics"]["demographic_gap"] == pytest.approx(max(shares) - min(shares))
    checks = report["metrics"]["size_and_sharpness"]
    for name in ("face_px", "sharpness"):
        assert sum(b[k]["n"] for b in checks[name]["bins"] for k in ("real", "fake")) == len(
            test_rows
        )
    text = capsys.readouterr().out
    assert "demographic gap" in text and "called real per group" in text
    assert "Spearman of prob_fake with sharpness" in text
    # The tiny set as prepared carries no labels: said so, no plot.
    plain = evaluate.main(["--checkpoint", str(tiny_runs["off"]), "--data", str(prepared),
                           "--out", str(tmp_path / "plain"), "--device", "cpu"])  # fmt: skip
    assert plain["metrics"]["demographics"] is None and plain["metrics"]["demographic_gap"] is None
    assert not (tmp_path / "plain" / "demographics.png").exists()
    assert "demographic gap: n/a (no real face" in capsys.readouterr().out


def test_explain_maps_are_normalised(tiny_runs, prepared):
    from common import load_split
    from model import load_checkpoint

    images, labels, _ = load_split(prepared, "test")
    for arm, names in (("on", {"Grad-CAM", "attention"}), ("off", {"Grad-CAM"})):
        model, _ = load_checkpoint(tiny_runs[arm] / "best.pt")
        prob, maps = evaluate.explain(model, images[:3], torch.device("cpu"))
        assert set(maps) == names and prob.shape == (3,)
        for m in maps.values():
            assert m.shape == (3, *images.shape[-2:]) and m.min() >= 0 and m.max() <= 1
        assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_default_checkpoint_is_lowest_val_loss(tiny_runs, tmp_path, prepared):
    runs = tmp_path / "runs"
    for arm in ("on", "off"):
        shutil.copytree(tiny_runs[arm], runs / arm)
    losses = {arm: torch.load(runs / arm / "best.pt", weights_only=True)["val_metrics"]["loss"]
              for arm in ("on", "off")}  # fmt: skip
    (runs / "broken").mkdir()
    (runs / "broken" / "best.pt").write_bytes(b"not a checkpoint")
    assert evaluate.find_best_run(runs) == runs / min(losses, key=losses.get) / "best.pt"
    # A run of another dataset: its validation loss does not compare with these.
    other = torch.load(runs / "on" / "best.pt", weights_only=True)
    other["manifest_sha256"], other["val_metrics"]["loss"] = "0" * 64, 0.0
    (runs / "other").mkdir()
    torch.save(other, runs / "other" / "best.pt")
    with pytest.raises(SystemExit, match="different datasets"):
        evaluate.find_best_run(runs)
    assert evaluate.find_best_run(runs, prepared) == runs / min(losses, key=losses.get) / "best.pt"


# ---------------------------------------------------------------- bad input
def one_line_error(argv):
    with pytest.raises(SystemExit) as exc:
        evaluate.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_missing_checkpoint_and_runs(tmp_path, prepared):
    msg = one_line_error(["--checkpoint", str(tmp_path / "nope.pt"), "--data", str(prepared)])
    assert "no such file" in msg
    one_line_error(["--checkpoint", str(tmp_path / "no-run-dir"), "--data", str(prepared)])
    assert "no run" in one_line_error(["--runs", str(tmp_path / "empty")])


def test_missing_data_folder(tiny_runs, tmp_path):
    msg = one_line_error(["--checkpoint", str(tiny_runs["off"]), "--data", str(tmp_path / "none")])
    assert "manifest.csv" in msg


class Payload:
    """Unpickling this runs a shell command: a checkpoint must never be allowed to."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_not_run(tmp_path, prepared):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "evil" / "best.pt"
    bad.parent.mkdir()
    torch.save({"format": "facecheck", "model": Payload(marker)}, bad)
    assert "refused" in one_line_error(["--checkpoint", str(bad), "--data", str(prepared)])
    with pytest.raises(SystemExit):
        evaluate.find_best_run(tmp_path)  # skipped as a candidate, not loaded with pickle
    assert not marker.exists()


def test_foreign_checkpoint(tmp_path, prepared):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert "not a facecheck checkpoint" in one_line_error(
        ["--checkpoint", str(other), "--data", str(prepared)]
    )


def test_empty_split(tiny_runs, prepared, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    lines = (data / "manifest.csv").read_text().splitlines(keepends=True)
    (data / "manifest.csv").write_text("".join(x for x in lines if ",test," not in x))
    msg = one_line_error(["--checkpoint", str(tiny_runs["off"]), "--data", str(data)])
    assert "no images" in msg


def test_a_gap_between_sources_is_not_read_as_one_between_groups():
    """Age 20-39 only from UTKFace (all called real), 60+ only from All-Age-Faces (half called
    real), gender mixed within each source and treated alike: the 50-point age gap is a
    difference between sources, and the shuffle within each source must not flag it (a
    shuffle over all faces would: p < 0.001)."""
    rows = [{"source": "utkface", "label": "real", "original": f"30_{k % 2}_0_x.jpg"}
            for k in range(100)]  # fmt: skip
    rows += [{"source": "allagefaces", "label": "real", "original": f"{k % 2 * 8000:05d}A65.jpg"}
             for k in range(100)]  # fmt: skip
    prob = np.r_[np.full(100, 0.1), np.tile([0.1, 0.1, 0.9, 0.9], 25)]
    d = demographics.called_real_by_group(rows, prob, 0.5)
    assert d["gap"]["gap"] == pytest.approx(0.5) and d["gap"]["worst"] == "age 60+"
    assert d["gap"]["by_chance"]["p"] > 0.2


def test_counts_below_their_least_are_refused_before_any_work(capsys):
    for bad in (["--batch-size", "0"], ["--heatmaps", "-1"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(bad)
        assert "is not >=" in capsys.readouterr().err
    assert evaluate.parse_args(["--heatmaps", "0", "--batch-size", "1"]).batch_size == 1
