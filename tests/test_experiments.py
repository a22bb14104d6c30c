"""experiments/: the attention-vs-saliency figure on the two tiny runs, the leave-one-out table."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "experiments"))


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
    import torch

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
                     str(tmp_path / "metrics.json"), "--out", str(tmp_path / "t.md")])  # fmt: skip
    lines = (tmp_path / "t.md").read_text().splitlines()[2:]
    assert [ln.split(" | ")[0] for ln in lines] == ["| a", "| b", "| g"]
    assert lines[0].endswith("| 0.950 |") and lines[1].endswith("| - |")


def test_experiment_scripts_parse():
    # The long plans (reproduce.sh, attention_v2.sh) run for hours unattended: a syntax
    # error must not wait until the step it sits in.
    for script in sorted((ROOT / "experiments").glob("*.sh")):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_run_record_keeps_each_run_once_with_its_history(tiny_runs, tmp_path):
    import run_record
    import torch

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

    import evaluate

    out = tmp_path / "results" / "runs.json"
    run_record.main([str(tiny_runs["off"]), str(tiny_runs["on"]), "--out", str(out)])
    from_ckpts = evaluate.compare_runs([tiny_runs["off"], tiny_runs["on"]], data=prepared)
    from_records = evaluate.compare_runs([out])
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
        evaluate.compare_runs([out])


def test_run_record_takes_a_dataset_prepared_again_but_not_another_split(
    tiny_runs, prepared, tmp_path
):
    # prepare_data.py on another machine: the same faces and splits, a face box's last digit
    # apart, so another manifest hash. Accepted, since validation scores as in training; a
    # dataset whose splits moved is refused.
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

    def moved(rows):
        val = [r for r in rows if r["split"] == "val"]
        train = [r for r in rows if r["split"] == "train"]
        for a, b in zip(val[:5], train[:5]):
            a["split"], b["split"] = "train", "val"

    out = tmp_path / "runs.json"
    again = copy_with(reworded)
    run_record.main([str(tiny_runs["off"]), "--out", str(out), "--data", str(again)])
    r = json.loads(out.read_text())["attention-off"]
    assert r["manifest_sha256"] != r["trained_manifest_sha256"]
    # Runs recorded on either copy still pair up: the same faces, another manifest hash.
    import evaluate

    run_record.main([str(tiny_runs["on"]), "--out", str(out)])
    assert len(evaluate.compare_runs([out])["mcnemar"]["val"]["pairs"]) == 1
    with pytest.raises(SystemExit, match="not the dataset it was trained on"):
        run_record.main([str(tiny_runs["off"]), "--out", str(out), "--data", str(copy_with(moved))])
