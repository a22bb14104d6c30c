"""evaluate.py: metrics on hand-made predictions, McNemar, perturbations, the per-source
table, the comparison of the two tiny runs, and one-line errors on bad input."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import common
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


def test_mcnemar_exact_known_values():
    # b = 10, c = 2: p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert evaluate.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert evaluate.mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    assert evaluate.mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert evaluate.mcnemar_exact(0, 0) == 1.0
    assert evaluate.mcnemar_exact(0, 6) == pytest.approx(2 / 64)


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


def test_pick_examples_mixes_classes_deterministically():
    labels = [0] * 10 + [1] * 5
    idx = evaluate.pick_examples(labels, 6)
    assert idx == evaluate.pick_examples(labels, 6) and len(set(idx)) == 6
    assert [labels[i] for i in idx] == [0, 1, 0, 1, 0, 1]
    assert len(evaluate.pick_examples([0, 0, 1], 8)) == 3  # never more than there are


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


def test_compare_tiny_runs(tiny_runs, prepared, tmp_path, capsys):
    out = tmp_path / "cmp"
    evaluate.main([
        "--compare", str(tiny_runs["off"]), str(tiny_runs["on"]), "--out", str(out),
        "--device", "cpu",
    ])  # fmt: skip
    result = json.loads((out / "compare.json").read_text())
    assert (out / "compare.md").read_text().startswith("| run | attention |")
    runs = {r["attention"]: r for r in result["runs"]}
    assert set(runs) == {"on", "off"}
    for r in runs.values():
        for key in ("seed", "params", "flops", "epochs", "train_seconds", "val_loss",
                    "val_accuracy", "val_f1", "test_accuracy", "test_f1", "test_auc"):  # fmt: skip
            assert r[key] is not None, key
        assert r["epochs"] == 2 and r["seed"] == 0
    assert runs["on"]["params"] > runs["off"]["params"]  # the attention layer costs parameters
    assert runs["on"]["flops"] > runs["off"]["flops"]
    for split in ("val", "test"):
        (pair,) = result["mcnemar"][split]["pairs"]
        assert pair["seed"] == 0 and pair["b"] + pair["c"] <= pair["n"]
        assert pair["p_value"] == pytest.approx(evaluate.mcnemar_exact(pair["b"], pair["c"]))
        assert result["mcnemar"][split]["pooled"]["b"] == pair["b"]
    # b - c is the accuracy gap in images: McNemar and the accuracies tell one story.
    val_pair = result["mcnemar"]["val"]["pairs"][0]
    gap = runs["on"]["val_accuracy"] - runs["off"]["val_accuracy"]
    assert val_pair["b"] - val_pair["c"] == round(gap * val_pair["n"])
    # test_accuracy matches a single-run evaluation of the same checkpoint.
    single = evaluate.main([
        "--checkpoint", str(tiny_runs["off"]), "--data", str(prepared), "--out", str(tmp_path / "e"),
        "--device", "cpu",
    ])  # fmt: skip
    assert runs["off"]["test_accuracy"] == pytest.approx(single["metrics"]["accuracy"])
    # Per source too: the same faces as the single evaluation's shortcut audit, which reads
    # the source from the manifest, not from the crop's folder.
    per_source = runs["off"]["test_per_source"]
    assert {s["source"]: (s["n"], pytest.approx(s["accuracy"])) for s in single["per_source"]} == {
        name: (s["n"], s["accuracy"]) for name, s in per_source.items()
    }
    # One run per arm: its arm's per-source mean is that run's, with no std.
    arm_off = result["arms"]["off"]["test_per_source"]
    assert {k: (v["mean"], v["std"]) for k, v in arm_off.items()} == {
        k: (v["accuracy"], None) for k, v in per_source.items()
    }
    assert "McNemar" in capsys.readouterr().out
    # A folder holding several runs is expanded; one run per arm gives no mean +- std table.
    parent = tmp_path / "runs"
    for arm, seed in (("on", 0), ("off", 0), ("on", 1)):
        shutil.copytree(tiny_runs[arm], parent / f"{arm}-s{seed}")
    three = evaluate.compare_runs([parent], data=str(prepared))
    assert len(three["runs"]) == 3 and three["arms"]["on"]["n_runs"] == 2
    assert len(three["mcnemar"]["val"]["pairs"]) == 1  # one "off" run to pair with
    text = evaluate.compare_markdown(three)
    assert "± " in text and "| on (stage 2) |" in text and "train min" in text
    assert "Accuracy per source, val split" in text
    on_val = three["arms"]["on"]["val_per_source"]
    runs_on = [r for r in three["runs"] if r["attention"] == "on"]
    for name, s in on_val.items():  # the mean over the arm's two runs
        accs = [r["val_per_source"][name]["accuracy"] for r in runs_on]
        assert s["mean"] == pytest.approx(sum(accs) / 2) and s["std"] is not None


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
    one_line_error(["--compare", str(tmp_path / "nothing-here")])


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
    one_line_error(["--compare", str(bad.parent)])
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


def test_lofo_flag_errors(tmp_path, tiny_runs):
    (tmp_path / "bad.json").write_text('{"not": "lofo"}')
    both = [str(tmp_path / "missing.json"), str(tmp_path / "bad.json")]
    assert "goes with --compare" in one_line_error(["--lofo", *both])
    for files in (both, [both[1], both[1]]):
        msg = one_line_error(["--compare", str(tiny_runs["off"]), "--lofo", *files])
        assert "not experiments/lofo.py results" in msg


def test_verdict_rule():
    def result(on_acc, off_acc, pairs, p, lofo=None):
        arm = lambda acc: {"val_accuracy": {"mean": acc, "std": 0.01}}  # noqa: E731
        b, c = sum(b for b, _ in pairs), sum(c for _, c in pairs)
        return {
            "arms": {"on": arm(on_acc), "off": arm(off_acc)},
            "mcnemar": {
                "val": {
                    "pairs": [{"b": b, "c": c} for b, c in pairs],
                    "pooled": {"b": b, "c": c, "p_value": p},
                }
            },
            **({"lofo": lofo} if lofo else {}),
        }

    def lofo(mean_on, mean_off, worst_on=0.5, worst_off=0.5):
        return {"sources": {"x": {}}, "mean_on": mean_on, "mean_off": mean_off,
                "worst_real_on": worst_on, "worst_real_off": worst_off}  # fmt: skip

    ahead = [(30, 5), (25, 6), (20, 10)]
    same = lofo(0.7, 0.7)
    # Route A: >= 1 point, ahead in 2 of 3 pairs, p < 0.05, and leave-one-out no worse.
    assert evaluate.verdict(result(0.92, 0.90, ahead, 1e-6, same)).startswith("attention helps")
    # Without leave-one-out, a validation lead alone decides nothing.
    assert evaluate.verdict(result(0.92, 0.90, ahead, 1e-6)).startswith("undecided")
    # Under a point, not significant, ahead in too few pairs, or worse when held out: off ships.
    for r in (
        result(0.905, 0.90, ahead, 1e-6, same),
        result(0.92, 0.90, ahead, 0.2, same),
        result(0.92, 0.90, [(40, 5), (5, 6), (5, 6)], 1e-6, same),  # pooled b > c, 1 of 3 ahead
        result(0.92, 0.90, ahead, 1e-6, lofo(0.6, 0.7)),
        result(0.92, 0.90, ahead, 1e-6, lofo(0.7, 0.7, worst_on=0.1, worst_off=0.3)),
    ):
        assert evaluate.verdict(r).startswith("no gain that pays"), r
    # Route B: level on validation, 5 points better on sources it never saw.
    assert evaluate.verdict(result(0.902, 0.90, [(10, 9)], 0.9, lofo(0.76, 0.70))).startswith(
        "attention helps"
    )
    assert evaluate.verdict(result(0.902, 0.90, [(10, 9)], 0.9, lofo(0.73, 0.70))).startswith(
        "no gain"
    )
    empty = {"arms": {}, "mcnemar": {"val": {"pairs": [], "pooled": None}}}
    assert evaluate.verdict(empty).startswith("undecided")


def test_lofo_comparison_pairs_the_sources_both_arms_held_out():
    on = [{"held_out": "a", "label": "real", "unseen_accuracy": 0.6},
          {"held_out": "b", "label": "fake", "unseen_accuracy": 0.9},
          {"held_out": "c", "label": "real", "unseen_accuracy": 0.1}]  # fmt: skip
    off = [{"held_out": "a", "label": "real", "unseen_accuracy": 0.4},
           {"held_out": "b", "label": "fake", "unseen_accuracy": 0.8}]  # fmt: skip
    got = evaluate.lofo_comparison(on, off)
    assert set(got["sources"]) == {"a", "b"}  # c was held out by one arm only
    assert got["mean_on"] == pytest.approx(0.75) and got["mean_off"] == pytest.approx(0.6)
    assert got["worst_real_on"] == 0.6 and got["worst_real_off"] == 0.4


def test_run_facts_training_time_is_the_whole_schedule(tmp_path):
    # best.pt keeps the time up to its own epoch; the cost of a run is every epoch it ran.
    (tmp_path / "history.csv").write_text(
        "epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds,images_per_s\n"
        "1,0.1,0.6,0.6,0.5,0.7,10.0,5\n2,0.1,0.5,0.7,0.6,0.6,12.5,5\n"
    )
    ckpt = {"config": {"attention": False}, "train_args": {"seed": 3}, "params": 7,
            "flops": 9, "epoch": 1, "train_seconds": 10.0, "threshold": 0.5}  # fmt: skip
    facts = evaluate.run_facts(None, ckpt, tmp_path)
    assert facts["epochs"] == 2 and facts["best_epoch"] == 1 and facts["seed"] == 3
    assert facts["train_seconds"] == pytest.approx(22.5)
    assert facts["seconds_to_best"] == pytest.approx(10.0)
