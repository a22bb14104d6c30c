"""experiments/lofo.py on the tiny dataset: holding out a real source scores its photos as reals;
a held-out source whose file names say who is in the photo gets the demographic audit."""

import csv
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))


def test_leave_one_real_source_out_scores_the_unseen_photos_as_real(
    tmp_path, prepared, monkeypatch
):
    import lofo

    from common import load_rows, read_manifest
    from model import load_checkpoint, predict

    out = tmp_path / "lofo-real.json"
    lofo.main([
        "--data", str(prepared), "--label", "real", "--epochs", "1", "--patience", "1",
        "--runs", str(tmp_path / "runs"), "--out", str(out),
    ])  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert [r["held_out"] for r in runs] == ["camera", "people"]

    rows = read_manifest(prepared)
    for result in runs:
        held_out = result["held_out"]
        subset = read_manifest(prepared.parent / f"{prepared.name}-without-{held_out}")
        assert {r["source"] for r in subset} == {r["source"] for r in rows} - {held_out}
        assert len(subset) == len([r for r in rows if r["source"] != held_out])

        # Recompute the headline figure independently: the held-out photos are real, so a
        # photo counts as right when its prob_fake is BELOW the run's threshold.
        model, ckpt = load_checkpoint(tmp_path / "runs" / f"without-{held_out}" / "best.pt")
        unseen = [r for r in rows if r["source"] == held_out]
        images = load_rows(unseen)
        prob = predict(model, images, torch.device("cpu"))[0].numpy()
        assert result["label"] == "real" and result["n_unseen"] == len(unseen)
        assert result["threshold"] == ckpt["threshold"]
        assert ckpt["train_args"]["patience"] == 1
        assert np.isclose(result["unseen_accuracy"], (prob < ckpt["threshold"]).mean())
        assert 0.0 <= result["unseen_vs_other_class_test_auc"] <= 1.0
        history = (tmp_path / "runs" / f"without-{held_out}" / "history.csv").read_text()
        epoch_seconds = [float(e["seconds"]) for e in csv.DictReader(history.splitlines())]
        assert result["train_seconds"] == pytest.approx(sum(epoch_seconds))  # every epoch
        assert result["seconds_to_best"] == pytest.approx(ckpt["train_seconds"])
        # The shortcut audit: the held-out photos (real) beside the fake test photos.
        audit = result["size_and_sharpness"]
        fakes = [r for r in rows if r["label"] == "fake" and r["split"] == "test"]
        bins = audit["sharpness"]["bins"]
        assert sum(b["real"]["n"] for b in bins) == len(unseen)
        assert sum(b["fake"]["n"] for b in bins) == len(fakes)
        assert audit["face_px"] is not None and 0 <= audit["face_px"]["alone_roc_auc"] <= 1

    # A run cut short (no done marker, not yet in --out) continues from its last.pt.
    again = [
        "--data", str(prepared), "--label", "real", "--epochs", "1", "--patience", "1",
        "--runs", str(tmp_path / "runs"), "--out", str(out),
    ]  # fmt: skip
    measured = out.read_text()
    out.write_text(json.dumps({"runs": runs[1:]}))  # camera's run was cut before its record
    (tmp_path / "runs" / "without-camera" / "done").unlink()
    calls = []
    monkeypatch.setattr(lofo.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    lofo.main(again)
    assert len(calls) == 1 and calls[0][-2:] == [
        "--resume",
        str(tmp_path / "runs" / "without-camera" / "last.pt"),
    ]
    assert [r["held_out"] for r in json.loads(out.read_text())["runs"]] == ["camera", "people"]

    # A result recorded before the size-and-sharpness audit gets it from its finished run,
    # which is loaded, not trained again, and must give the recorded accuracy.
    older = json.loads(measured)
    del older["runs"][0]["size_and_sharpness"]
    out.write_text(json.dumps(older))
    calls.clear()
    lofo.main(again)
    assert calls == [] and json.loads(out.read_text()) == json.loads(measured)
    older["runs"][0]["unseen_accuracy"] += 0.5
    out.write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="recorded"):
        lofo.main(again)

    # A fresh machine (no runs/): the sources already in --out are not trained again...
    out.write_text(measured)
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    lofo.main(again)
    assert calls == [] and json.loads(out.read_text()) == json.loads(measured)
    # ...unless they were measured at another schedule.
    with pytest.raises(FileNotFoundError):  # it trains (a no-op here), then looks for best.pt
        lofo.main([*again[:4], "--epochs", "2", *again[6:]])
    assert (
        len(calls) == 1
        and "--epochs" in calls[0]
        and calls[0][calls[0].index("--epochs") + 1] == "2"
    )


def test_the_attention_arm_trains_and_checks_its_placement(tmp_path, monkeypatch):
    import lofo

    on = lofo.wanted_recipe(lofo.parse_args(["--attention", "on", "--attention-stage", "1"]))
    off = lofo.wanted_recipe(lofo.parse_args([]))
    assert on["attention_stage"] == 1 and "attention_stage" not in off

    calls = []
    monkeypatch.setattr(lofo.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    (tmp_path / "run").mkdir()  # train.py would have made it
    trained = {**on, "attention_stage": 2}  # the other placement
    monkeypatch.setattr(lofo, "load_checkpoint", lambda path: (None, {"train_args": trained}))
    with pytest.raises(SystemExit, match="attention_stage"):  # not reused as if it matched
        lofo.train_without(tmp_path / "subset", tmp_path / "run", on)
    assert calls[0][-2:] == ["--attention-stage", "1"]


def test_held_out_labelled_source_gets_who_is_called_fake(monkeypatch, capsys):
    import lofo

    # 30 UTKFace women (age 25) held out, half called real; 30 men, all called real; the other
    # class's test images and a seen real source around them.
    def row(source, label, split, original):
        return {"source": source, "label": label, "split": split, "original": original}

    rows = [row("utkface", "real", "train", f"25_{i // 30}_0_{i}.jpg") for i in range(60)]
    rows += [row("gan", "fake", "test", f"g{i}.png") for i in range(10)]
    rows += [row("lfw", "real", "test", f"l{i}.jpg") for i in range(5)]
    prob = {f"25_1_0_{i}.jpg": 0.9 if i % 2 else 0.1 for i in range(30, 60)}
    monkeypatch.setattr(lofo, "score", lambda model, rows, with_sharpness: (
        np.array([prob.get(r["original"], 0.2) for r in rows]), np.zeros(len(rows))))  # fmt: skip
    ckpt = {"threshold": 0.5, "epoch": 1, "unsure_band": [0.3, 0.8]}
    result = lofo.score_held_out(None, ckpt, rows, "utkface", is_fake=False)
    assert result["unseen_accuracy"] == pytest.approx(45 / 60)
    groups = {g["group"]: g for g in result["demographics"]["groups"]}
    assert groups["female"]["n"] == 30 and groups["female"]["called_real"] == pytest.approx(0.5)
    assert groups["female"]["called_fake_confidently"] == pytest.approx(0.5)
    assert groups["male"]["called_real"] == 1.0 and groups["White"]["n"] == 60
    assert result["demographics"]["gap"]["gap"] == pytest.approx(0.5)
    json.dumps(result)  # lands in --out as is
    lofo.print_table([result])
    assert "| 50.0 (gender female 0.50) |" in capsys.readouterr().out
    # A source without labels (here a fake one): no audit, a dash in the table.
    fake = lofo.score_held_out(None, ckpt, rows, "gan", is_fake=True)
    assert fake["demographics"] is None and lofo.demographic_gap(fake) == "-"


def test_flags_after_the_double_dash_are_the_recipe(capsys):
    """train.py flags after -- go into the recipe every run is checked against (the data-v3
    options and any other flag given, such as --lr); the flags lofo.py sets itself are refused
    there, where train.py would take the last of two and the results would misreport the run."""
    import lofo

    args = lofo.parse_args(
        ["--epochs", "6", "--", "--native-p", "0.9", "--no-highpass", "--lr", "3e-4"]
    )
    recipe = lofo.wanted_recipe(args)
    assert recipe["epochs"] == 6 and recipe["native_p"] == 0.9 and recipe["no_highpass"] is True
    assert recipe["lr"] == pytest.approx(3e-4) and recipe["rotate"] == 0.0
    assert "lr" not in lofo.wanted_recipe(lofo.parse_args(["--epochs", "6"]))
    for flag in (["--epochs", "16"], ["--patience=3"], ["--data", "x"]):
        with pytest.raises(SystemExit):
            lofo.parse_args(["--", *flag])
        assert "give it to lofo.py itself" in capsys.readouterr().err
