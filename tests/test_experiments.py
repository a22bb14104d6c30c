"""experiments/: the comparison of runs (compare.py: McNemar, the verdict rule, recorded runs),
the attention-vs-saliency figure on the two tiny runs, the leave-one-out table."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import evaluate

sys.path.insert(0, str(ROOT / "experiments"))

import compare  # noqa: E402


# ---------------------------------------------------------------- experiments/compare.py
def test_mcnemar_exact_known_values():
    # b = 10, c = 2: p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096.
    assert compare.mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert compare.mcnemar_exact(2, 10) == pytest.approx(158 / 4096)
    assert compare.mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert compare.mcnemar_exact(0, 0) == 1.0
    assert compare.mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def test_compare_tiny_runs(tiny_runs, prepared, tmp_path, capsys):
    out = tmp_path / "cmp"
    compare.main(
        [str(tiny_runs["off"]), str(tiny_runs["on"]), "--out", str(out), "--device", "cpu"]
    )
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
        assert pair["p_value"] == pytest.approx(compare.mcnemar_exact(pair["b"], pair["c"]))
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
    three = compare.compare_runs([parent], data=str(prepared))
    assert len(three["runs"]) == 3 and three["arms"]["on"]["n_runs"] == 2
    assert len(three["mcnemar"]["val"]["pairs"]) == 1  # one "off" run to pair with
    text = compare.compare_markdown(three)
    assert "± " in text and "| on (stage 2) |" in text and "train min" in text
    assert "Accuracy per source, val split" in text
    on_val = three["arms"]["on"]["val_per_source"]
    runs_on = [r for r in three["runs"] if r["attention"] == "on"]
    for name, s in on_val.items():  # the mean over the arm's two runs
        accs = [r["val_per_source"][name]["accuracy"] for r in runs_on]
        assert s["mean"] == pytest.approx(sum(accs) / 2) and s["std"] is not None


def one_line_error(argv):
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_compare_errors_in_one_line(tmp_path, tiny_runs):
    assert "no best.pt" in one_line_error([str(tmp_path / "nothing-here"), "--device", "cpu"])
    (tmp_path / "bad.json").write_text('{"not": "lofo"}')
    both = [str(tmp_path / "missing.json"), str(tmp_path / "bad.json")]
    for files in (both, [both[1], both[1]]):
        msg = one_line_error([str(tiny_runs["off"]), "--lofo", *files])
        assert "not experiments/lofo.py results" in msg
    # A checkpoint that would run code when unpickled is refused, not loaded.
    from test_evaluate import Payload

    marker = tmp_path / "PWNED"
    (tmp_path / "evil").mkdir()
    torch.save({"format": "facecheck", "model": Payload(marker)}, tmp_path / "evil" / "best.pt")
    assert "refused" in one_line_error([str(tmp_path / "evil"), "--device", "cpu"])
    assert not marker.exists()


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
    assert compare.verdict(result(0.92, 0.90, ahead, 1e-6, same)).startswith("attention helps")
    # Without leave-one-out, a validation lead alone decides nothing.
    assert compare.verdict(result(0.92, 0.90, ahead, 1e-6)).startswith("undecided")
    # Under a point, not significant, ahead in too few pairs, or worse when held out: off ships.
    for r in (
        result(0.905, 0.90, ahead, 1e-6, same),
        result(0.92, 0.90, ahead, 0.2, same),
        result(0.92, 0.90, [(40, 5), (5, 6), (5, 6)], 1e-6, same),  # pooled b > c, 1 of 3 ahead
        result(0.92, 0.90, ahead, 1e-6, lofo(0.6, 0.7)),
        result(0.92, 0.90, ahead, 1e-6, lofo(0.7, 0.7, worst_on=0.1, worst_off=0.3)),
    ):
        assert compare.verdict(r).startswith("no gain that pays"), r
    # Route B: level on validation, 5 points better on sources it never saw.
    assert compare.verdict(result(0.902, 0.90, [(10, 9)], 0.9, lofo(0.76, 0.70))).startswith(
        "attention helps"
    )
    assert compare.verdict(result(0.902, 0.90, [(10, 9)], 0.9, lofo(0.73, 0.70))).startswith(
        "no gain"
    )
    empty = {"arms": {}, "mcnemar": {"val": {"pairs": [], "pooled": None}}}
    assert compare.verdict(empty).startswith("undecided")


def test_lofo_comparison_pairs_the_sources_both_arms_held_out():
    on = [{"held_out": "a", "label": "real", "unseen_accuracy": 0.6},
          {"held_out": "b", "label": "fake", "unseen_accuracy": 0.9},
          {"held_out": "c", "label": "real", "unseen_accuracy": 0.1}]  # fmt: skip
    off = [{"held_out": "a", "label": "real", "unseen_accuracy": 0.4},
           {"held_out": "b", "label": "fake", "unseen_accuracy": 0.8}]  # fmt: skip
    got = compare.lofo_comparison(on, off)
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
    facts = compare.run_facts(None, ckpt, tmp_path)
    assert facts["epochs"] == 2 and facts["best_epoch"] == 1 and facts["seed"] == 3
    assert facts["train_seconds"] == pytest.approx(22.5)
    assert facts["seconds_to_best"] == pytest.approx(10.0)


# ---------------------------------------------------------------- the other experiments
def test_attention_figure_shows_both_arms_on_the_same_faces(tiny_runs, prepared, tmp_path, capsys):
    import attention_figure

    out = tmp_path / "fig.png"
    attention_figure.main(["--on", str(tiny_runs["on"]), "--off", str(tiny_runs["off"]),
                           "--split", "val", "--out", str(out)])  # fmt: skip
    with Image.open(out) as im:
        im.verify()
    n_sources = 4  # the tiny set's camera, people, ganA and ganB
    assert f"{n_sources} faces" in capsys.readouterr().out
    # Arms swapped: refused in one line, nothing written.
    with pytest.raises(SystemExit, match="is not an attention-o(n|ff) model"):
        attention_figure.main(["--on", str(tiny_runs["off"]), "--off", str(tiny_runs["on"]),
                               "--out", str(tmp_path / "no.png")])  # fmt: skip
    assert not (tmp_path / "no.png").exists()
    # A run trained on the same faces prepared again (another manifest hash) is drawn, with a
    # warning; two runs that would be scored on different datasets are refused.
    again = tmp_path / "again"
    again.mkdir()
    ckpt = torch.load(tiny_runs["off"] / "best.pt", weights_only=True)
    torch.save({**ckpt, "manifest_sha256": "0" * 64}, again / "best.pt")
    attention_figure.main(["--on", str(tiny_runs["on"]), "--off", str(again),
                           "--out", str(tmp_path / "again.png")])  # fmt: skip
    assert (
        tmp_path / "again.png"
    ).is_file() and "manifest_sha256 differs" in capsys.readouterr().err
    torch.save({**ckpt, "data": str(tmp_path / "elsewhere")}, again / "best.pt")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "manifest.csv").write_text((prepared / "manifest.csv").read_text())
    with pytest.raises(SystemExit, match="scored on different datasets"):
        attention_figure.main(["--on", str(tiny_runs["on"]), "--off", str(again),
                               "--out", str(tmp_path / "no.png")])  # fmt: skip


def test_faces_per_source_takes_each_source_once_reals_first():
    import attention_figure

    rows = [{"source": s, "label": lab} for s, lab in
            [("g", "fake"), ("a", "real"), ("g", "fake"), ("b", "real"), ("a", "real")]]  # fmt: skip
    assert attention_figure.faces_per_source(rows, 1) == [1, 3, 0]
    assert attention_figure.faces_per_source(rows, 2) == [1, 4, 3, 0, 2]


def test_lofo_table_lists_reals_first_worst_first(tmp_path, capsys):
    import lofo_table

    run = {"n_unseen": 10, "unseen_accuracy_at_0.5": 0.5, "threshold": 0.5,
           "unseen_vs_other_class_test_auc": 0.6, "other_class_test_accuracy": 0.7,
           "seen_test_accuracy": 0.8}  # fmt: skip
    runs = [{**run, "held_out": "g", "label": "fake", "unseen_accuracy": 0.1},
            {**run, "held_out": "b", "label": "real", "unseen_accuracy": 0.9},
            {**run, "held_out": "a", "label": "real", "unseen_accuracy": 0.2}]  # fmt: skip
    (tmp_path / "lofo.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "metrics.json").write_text(
        json.dumps({"per_source": [{"source": "a", "accuracy": 0.95}]})
    )
    lofo_table.main([str(tmp_path / "lofo.json"), "--in-distribution",
                     str(tmp_path / "metrics.json"), "--out", str(tmp_path / "t.md"),
                     "--plot", str(tmp_path / "t.png")])  # fmt: skip
    lines = (tmp_path / "t.md").read_text().splitlines()[2:]
    assert [ln.split(" | ")[0] for ln in lines[:3]] == ["| a", "| b", "| g"]
    assert lines[0].endswith("| 0.950 |") and lines[1].endswith("| - |")
    # The targets on the sources so far: mean (0.1 + 0.9 + 0.2) / 3; one real of two >= 0.70.
    assert lines[4] == ("3 sources held out so far: mean accuracy on them 0.400 (target >= 0.80); "
                        "held-out real sources called real >= 0.70: 1 of 2 (target: all).")  # fmt: skip
    with Image.open(tmp_path / "t.png") as im:
        assert im.format == "PNG" and im.size[1] > 100
    # A held-out source with the demographic audit gets its groups in a second table.
    groups = [{"attribute": "race", "group": "White", "n": 30, "called_real": 0.6},
              {"attribute": "race", "group": "Black", "n": 25, "called_real": 0.9},
              {"attribute": "race", "group": "Other", "n": 4, "called_real": 0.0}]  # fmt: skip
    gap = {"gap": 0.3, "best": "race Black", "worst": "race White"}
    runs[1]["demographics"] = {"min_n": 20, "groups": groups, "gap": gap}
    text = lofo_table.table(runs, {})
    assert "| b | race | White | 30 | 0.600 |" in text and "| b | race | Other | 4 (few) |" in text
    assert "| b | gap, groups of >= 20 | race Black - race White | | 0.300 |" in text
    # The size-and-sharpness audit, where a result has it: reals first, worst first.
    check = {"alone_roc_auc": 0.71, "spearman": {"real": 0.456, "fake": None}}
    runs[2]["size_and_sharpness"] = {"face_px": check, "sharpness": check}
    runs[0]["size_and_sharpness"] = {"face_px": None, "sharpness": check}
    text = lofo_table.table(runs, {}).splitlines()
    audit = text[text.index("|---|---|---|---|---|---|") + 1 :]
    assert audit == [
        "| a | real | 0.71 | +0.46 | 0.71 | +0.46 |",
        "| g | fake | - | - | 0.71 | - |",
    ]
    del runs[0]["size_and_sharpness"], runs[2]["size_and_sharpness"]
    # The README row's cells: reals then fakes, worst first; the earlier recipe on the same
    # sources in that order, and the sources it never had.
    earlier = [{**runs[0], "unseen_accuracy": 0.3}, {**runs[2], "unseen_accuracy": 0.4}]
    ours, theirs = lofo_table.readme_cells(runs, earlier)
    assert ours == ("held out, called real: a 0.200 (ROC-AUC 0.600), b 0.900 (0.600); "
                    "caught: g 0.100 (0.600); mean 0.400")  # fmt: skip
    assert theirs == "data-v2 recipe: a 0.400 (0.600), g 0.300 (0.600); b not in data v2"


def test_experiment_scripts_parse():
    # The long plans (reproduce.sh, attention_v2.sh) run for hours unattended: a syntax
    # error must not wait until the step it sits in.
    for script in sorted((ROOT / "experiments").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_run_record_keeps_each_run_once_with_its_history(tiny_runs, tmp_path):
    import run_record

    out = tmp_path / "results" / "runs.json"
    out.parent.mkdir()
    run_record.main([str(tiny_runs["on"]), "--out", str(out)])
    run_record.main([str(tiny_runs["off"]), str(tiny_runs["on"]), "--out", str(out)])  # again
    records = json.loads(out.read_text())
    assert sorted(records) == ["attention-off", "attention-on"]
    on = records["attention-on"]
    ckpt = torch.load(tiny_runs["on"] / "best.pt", weights_only=True)
    assert on["val_loss"] == ckpt["val_metrics"]["loss"] and on["best_epoch"] == ckpt["epoch"]
    assert on["attention"] == "on" and on["attention_stage"] == 2 and on["epochs"] == 2
    assert records["attention-off"]["attention_stage"] is None
    copied = out.parent / "attention-on-history.csv"
    assert copied.read_text() == (tiny_runs["on"] / "history.csv").read_text()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
    assert on["predictions"] == "predictions/attention-on.csv.gz"


def test_recorded_runs_compare_exactly_as_their_checkpoints(tiny_runs, prepared, tmp_path):
    # A fresh machine has results/ but no runs/: the comparison from the recorded logits must
    # be the one from the checkpoints, to the last digit.
    import run_record

    out = tmp_path / "results" / "runs.json"
    run_record.main([str(tiny_runs["off"]), str(tiny_runs["on"]), "--out", str(out)])
    from_ckpts = compare.compare_runs([tiny_runs["off"], tiny_runs["on"]], data=prepared)
    from_records = compare.compare_runs([out])
    for a, b in zip(from_ckpts["runs"], from_records["runs"], strict=True):
        keys = ("val_loss", "val_accuracy", "val_f1", "test_loss", "test_accuracy", "test_auc")
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert from_ckpts["mcnemar"] == from_records["mcnemar"]
    assert from_ckpts["verdict"] == from_records["verdict"]

    # A record without its logits (written before they were kept) is named, not skipped.
    records = json.loads(out.read_text())
    del records["attention-on"]["predictions"]
    out.write_text(json.dumps(records))
    with pytest.raises(SystemExit, match="attention-on recorded without predictions"):
        compare.compare_runs([out])


def test_run_record_takes_a_dataset_prepared_again_but_not_another_split(
    tiny_runs, prepared, tmp_path
):
    # prepare_data.py on another machine: the same faces and splits, a face box's last digit
    # apart: the same manifest hash (it covers the splits). A checkpoint from before, whose hash
    # covered the whole file, is accepted since validation scores as in training; a dataset
    # whose splits moved is refused.
    import run_record

    from common import read_manifest, write_csv

    def copy_with(change):
        data = tmp_path / f"data-{change.__name__}"
        data.mkdir()
        (data / "images").symlink_to(prepared / "images")
        rows = read_manifest(prepared)
        fields = [k for k in rows[0] if k != "file"]
        change(rows)
        write_csv(data / "manifest.csv", [{k: r[k] for k in fields} for r in rows], fields)
        return data

    def reworded(rows):
        rows[0]["original"] += " "
        rows[0]["width"] += "0"

    def moved(rows):
        val = [r for r in rows if r["split"] == "val"]
        train = [r for r in rows if r["split"] == "train"]
        for a, b in zip(val[:5], train[:5]):
            a["split"], b["split"] = "train", "val"

    out = tmp_path / "runs.json"
    again = copy_with(reworded)
    run_record.main([str(tiny_runs["off"]), "--out", str(out), "--data", str(again)])
    r = json.loads(out.read_text())["attention-off"]
    assert r["manifest_sha256"] == r["trained_manifest_sha256"]
    older = tmp_path / "older" / "attention-off"
    shutil.copytree(tiny_runs["off"], older)
    ckpt = torch.load(older / "best.pt", weights_only=True)
    torch.save({**ckpt, "manifest_sha256": "0" * 64}, older / "best.pt")
    run_record.main([str(older), "--out", str(tmp_path / "older.json"), "--data", str(again)])
    r = json.loads((tmp_path / "older.json").read_text())["attention-off"]
    assert r["manifest_sha256"] != r["trained_manifest_sha256"] == "0" * 64
    # Runs recorded on either copy still pair up: the same faces, another manifest hash.
    run_record.main([str(tiny_runs["on"]), "--out", str(out)])
    assert len(compare.compare_runs([out])["mcnemar"]["val"]["pairs"]) == 1
    with pytest.raises(SystemExit, match="not the dataset it was trained on"):
        run_record.main([str(tiny_runs["off"]), "--out", str(out), "--data", str(copy_with(moved))])


# ---------------------------------------------------------------- experiments/finder_parity.py
def test_parity_scores_each_pipeline_at_its_own_models_threshold():
    import finder_parity

    assert finder_parity.pipeline_names("auto", "m.onnx", None) == ("mtcnn", "auto")
    a, b = finder_parity.pipeline_names("mtcnn", "m.onnx", "m.int8.onnx")
    assert (a, b) == ("mtcnn+m.onnx", "mtcnn+m.int8.onnx")
    rows = [{"source": "s", "label": "fake"}, {"source": "s", "label": "real"},
            {"source": "t", "label": "fake"}]  # fmt: skip
    # prob 0.6 on a fake: right at threshold 0.5 (a), wrong at 0.7 (b); the real at 0.2 is right
    # for both; the third photo has no face for b, so it is left out of the comparison.
    probs = {a: [0.6, 0.2, 0.9], b: [0.6, 0.2, None]}
    table = finder_parity.compare(rows, probs, {a: 0.5, b: 0.7})
    assert table["s"][f"accuracy_{a}"] == 1.0 and table["s"][f"accuracy_{b}"] == 0.5
    assert table["s"][f"only_{a}_right"] == 1 and table["s"][f"only_{b}_right"] == 0
    assert table["s"]["labels_agree"] == 0.5
    assert table["all"]["both"] == 2 and table["all"][f"with_face_{b}"] == 2
    assert list(table) == ["s", "t", "all"]


def test_parity_refuses_to_compare_a_pipeline_with_itself(capsys, tmp_path):
    import finder_parity

    for argv in (["--finder", "mtcnn"],
                 ["--finder", "mtcnn", "--model", "m.onnx", "--candidate-model", "./m.onnx"]):  # fmt: skip
        with pytest.raises(SystemExit):
            finder_parity.parse_args(argv)
        assert "give --candidate-model" in capsys.readouterr().err
    args = finder_parity.parse_args(["--finder", "mtcnn", "--candidate-model", "x.onnx"])
    assert args.candidate_model == "x.onnx"
    # The same model given twice under another finder is no candidate model: names stay short.
    args = finder_parity.parse_args(["--finder", "auto", "--model", "m.onnx",
                                     "--candidate-model", str(Path("m.onnx").resolve())])  # fmt: skip
    assert args.candidate_model is None
    # Two files of one name are told apart by their paths.
    assert finder_parity.pipeline_names("auto", "a/m.onnx", "b/m.onnx") == (
        "mtcnn+a/m.onnx", "auto+b/m.onnx")  # fmt: skip


def test_parity_of_two_models_finds_the_faces_once(monkeypatch, tmp_path):
    """--finder mtcnn with a candidate model: one detector, the same faces for both models,
    each scored at its own threshold, both thresholds in the report."""
    import finder_parity

    made, seen = [], []

    class Detector:
        def __init__(self, finder):
            made.append(finder)

    def fake_model(threshold, bias):
        def run(x):
            seen.append(x.copy())
            fake = x.mean(axis=(1, 2, 3)) * 8 - 4 + bias  # brighter face, more "fake"
            return np.stack([np.zeros_like(fake), fake], axis=1)

        return run, {"faces": "mtcnn", "image_size": 4, "threshold": threshold}

    models = {"m.onnx": fake_model(0.5, 0.0), "m.int8.onnx": fake_model(0.6, 0.1)}
    rows = [{"source": "s", "label": "fake" if k % 2 else "real", "original": f"{k}.jpg"}
            for k in range(6)]  # fmt: skip
    faces = {f"{k}.jpg": np.full((4, 4, 3), 40 * k, np.uint8) for k in range(6)}
    monkeypatch.setattr(finder_parity, "FaceDetector", lambda finder: Detector(finder))
    monkeypatch.setattr(finder_parity, "load_model", lambda path: models[path])
    monkeypatch.setattr(finder_parity, "read_manifest", lambda data, split: rows)
    monkeypatch.setattr(
        finder_parity,
        "largest_face_input",
        lambda path, size, detectors: {f: faces[Path(path).name] for f in detectors},
    )
    out = tmp_path / "parity.json"
    finder_parity.main(["--finder", "mtcnn", "--model", "m.onnx",
                        "--candidate-model", "m.int8.onnx", "--json", str(out)])  # fmt: skip
    assert made == ["mtcnn"]
    assert len(seen) == 2 and np.array_equal(seen[0], seen[1])
    result = json.loads(out.read_text())
    a, b = result["pipelines"]
    assert (a, b) == ("mtcnn+m.onnx", "mtcnn+m.int8.onnx")
    assert result["thresholds"] == {a: 0.5, b: 0.6}
    assert result["per_source"]["all"]["both"] == 6
