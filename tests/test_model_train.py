"""model.py, train.py and calibrate.py: shapes, budget, attention, losses, early stopping,
checkpoints, resume, the refusal of pickle payloads, the threshold and unsure-band rule."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import calibrate
import train
from model import CheckpointError, FaceCheckNet, count_flops, count_parameters, load_checkpoint


@pytest.mark.parametrize("attention", [False, True])
def test_output_shapes(attention):
    model = FaceCheckNet({"attention": attention}).eval()
    for n in (1, 3):
        assert model(torch.rand(n, 3, 128, 128)).shape == (n, 2)


def test_parameter_budget_and_the_only_difference_is_the_attention_layer():
    on, off = FaceCheckNet({"attention": True}), FaceCheckNet({"attention": False})
    assert count_parameters(on) <= 3_000_000 and count_parameters(off) <= 3_000_000  # the budget
    assert off.attention is None
    assert count_parameters(on) - count_parameters(off) == count_parameters(on.attention)
    names_off = set(off.state_dict())
    assert {k for k in on.state_dict() if not k.startswith("attention.")} == names_off
    assert count_flops(on) > count_flops(off) > 0


@pytest.mark.parametrize("stage, positions", [(2, 16 * 16), (1, 32 * 32)])
def test_attention_rows_sum_to_one_and_start_as_identity(stage, positions):
    model = FaceCheckNet({"attention": True, "attention_stage": stage}).eval()
    torch.nn.init.normal_(model.attention.query.weight)
    model.attention.keep_map = True
    x = torch.rand(2, 3, 128, 128)
    model(x)
    attn = model.attention.last_map
    assert attn.shape == (2, positions, positions)
    assert torch.allclose(attn.sum(-1), torch.ones(2, positions), atol=1e-5)
    # gamma starts at 0: the layer is the identity until training moves it, wherever it sits.
    plain = FaceCheckNet({"attention": False}).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("attention.")}
    )
    assert torch.allclose(model(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_attention_equals_the_plain_formula(stage):
    # Training and export take F.scaled_dot_product_attention; the heatmaps take the plain
    # softmax(QK^T)V that keeps the map. They must be the same layer, gradients included.
    torch.manual_seed(0)
    model = FaceCheckNet({"attention": True, "attention_stage": stage}).eval()
    layer = model.attention
    torch.nn.init.normal_(layer.query.weight)
    torch.nn.init.normal_(layer.position, std=0.5)
    layer.gamma.data.fill_(1.0)
    x = torch.rand(2, 3, 128, 128)
    outputs, grads = [], []
    for keep_map in (False, True):
        layer.keep_map = keep_map
        model.zero_grad()
        out = model(x)
        out.sum().backward()
        outputs.append(out.detach())
        grads.append(layer.query.weight.grad.clone())
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_attention_stage_is_checked():
    with pytest.raises(ValueError, match="attention_stage"):
        FaceCheckNet({"attention": True, "attention_stage": 3})


def test_focal_loss_with_gamma_zero_is_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(32, 2), torch.randint(0, 2, (32,))
    weight = torch.tensor([0.7, 1.9])
    expected = F.cross_entropy(logits, targets, weight=weight)
    assert torch.allclose(train.focal_loss(logits, targets, weight, gamma=0.0), expected, atol=1e-6)
    # gamma > 0 down-weights easy examples: the loss can only shrink.
    assert train.focal_loss(logits, targets, weight, gamma=2.0) < expected


def test_class_weights_balance_the_classes():
    labels = torch.tensor([0, 0, 0, 1])
    w = train.class_weights(labels)
    assert torch.allclose(w, torch.tensor([4 / 6, 4 / 2]))
    assert torch.isclose((w[labels]).sum() / 2, w[0] * 3)  # each class carries half the total
    with pytest.raises(SystemExit):
        train.class_weights(torch.tensor([0, 0]))


def test_source_balanced_weights_equalise_sources_within_a_class():
    rows = [{"label": "real", "source": "big"}] * 9 + [{"label": "real", "source": "small"}] * 1
    rows += [{"label": "fake", "source": "gan"}] * 5
    w = train.source_balanced_weights(rows)
    assert torch.isclose(w[:9].sum(), w[9:10].sum())
    assert torch.isclose(w[:10].sum(), torch.tensor(10.0, dtype=w.dtype))  # class totals kept


def test_early_stopping_fires_on_a_plateau():
    stopper = train.EarlyStopping(patience=3)
    assert [stopper.step(v) for v in [1.0, 0.8, 0.7]] == [False] * 3
    assert [stopper.step(v) for v in [0.7, 0.75, 0.71]] == [False, False, True]
    assert stopper.best == 0.7


def read_history(run):
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_epochs_lower_the_training_loss(tiny_runs):
    for run in tiny_runs.values():
        history = read_history(run)
        assert [int(h["epoch"]) for h in history] == [1, 2]
        assert float(history[1]["train_loss"]) < float(history[0]["train_loss"])
        assert (run / "curves.png").stat().st_size > 0


def test_checkpoint_round_trip_rebuilds_an_identical_model(tiny_runs, prepared):
    from common import manifest_hash

    for attention, run in tiny_runs.items():
        model, ckpt = load_checkpoint(run / "best.pt")
        raw = torch.load(run / "best.pt", weights_only=True)
        assert ckpt["config"]["attention"] == (attention == "on")
        assert ckpt["manifest_sha256"] == manifest_hash(prepared)
        assert 0.0 < ckpt["threshold"] < 1.0 and ckpt["class_names"] == ["real", "fake"]
        for key in ("image_size", "epoch", "val_metrics", "git_commit", "params", "flops"):
            assert key in ckpt
        rebuilt = FaceCheckNet(raw["config"]).eval()
        rebuilt.load_state_dict(raw["model"])
        x = torch.rand(4, 3, 32, 32)
        assert torch.equal(model(x), rebuilt(x))


def payload_checkpoint(path, marker):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "facecheck", "model": Payload()}, path)


def test_bad_checkpoints_are_refused(tmp_path, tiny_runs):
    marker = tmp_path / "payload-ran"
    payload_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a facecheck checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    ckpt = torch.load(tiny_runs["off"] / "best.pt", weights_only=True)
    ckpt["config"]["widths"] = [8, 8, 8, 8]
    torch.save(ckpt, tmp_path / "wrong-shape.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "wrong-shape.pt")
    # The fields every script reads beside the weights: one line each, not a KeyError later.
    bad_fields = [({"version": 99}, "version 99"), ({"image_size": 160}, "image_size 160"),
                  ({"image_size": None}, "image_size None"), ({"threshold": None}, "threshold"),
                  ({"threshold": 1.5}, "threshold 1.5"), ({"unsure_band": [0.9, 0.1]}, "unsure_band"),
                  ({"unsure_band": [0.1]}, "unsure_band")]  # fmt: skip
    for change, message in bad_fields:
        bad = {**torch.load(tiny_runs["off"] / "best.pt", weights_only=True), **change}
        torch.save(bad, tmp_path / "bad-field.pt")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "bad-field.pt")
    for missing in ("threshold", "image_size"):
        bad = torch.load(tiny_runs["off"] / "best.pt", weights_only=True)
        del bad[missing]
        torch.save(bad, tmp_path / "bad-field.pt")
        with pytest.raises(CheckpointError, match=missing):
            load_checkpoint(tmp_path / "bad-field.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "garbage.pt")


def test_train_resume_refuses_a_pickle_payload(tmp_path):
    marker = tmp_path / "payload-ran"
    payload_checkpoint(tmp_path / "evil.pt", marker)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(tmp_path / "evil.pt")],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode != 0 and "refused" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, prepared, workers):
    # With loader workers too: their augmentation must not depend on a worker's RNG state,
    # which last.pt cannot hold (they once drew from it, and a resumed run drifted).
    common = ["--data", str(prepared), "--epochs", "3", "--batch-size", "16",
              "--workers", str(workers), "--seed", "3", "--attention", "on", "--patience", "10"]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "train.py")]
    subprocess.run(
        [*cmd, *common, "--out", str(tmp_path / "straight")],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )

    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, *common, "--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while not (run / "history.csv").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_history(run))
    assert 1 <= done < 3, "the run ended before the kill: nothing was resumed"
    # Typed with --resume, a setting of the run's own is ignored, and said to be.
    result = subprocess.run([*cmd, "--resume", str(run / "last.pt"), "--epochs", "7"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning: --epochs 7 ignored: a resumed run keeps its own settings (3)" in result.stderr
    assert [int(h["epoch"]) for h in read_history(run)] == [1, 2, 3]
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    b = torch.load(run / "last.pt", weights_only=True)["model"]
    for key in a:  # deterministic on CPU: the resumed run ends exactly where the straight one does
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def children(pid):
    """PIDs whose parent is pid (Linux /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue  # gone, or a line without a tab
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def test_sigterm_to_the_whole_job_stops_cleanly_with_loader_workers(tmp_path, prepared):
    # A scheduler (SLURM's scancel, `kill -- -PGID`) signals every process of the job, loader
    # workers included: the run must still stop the Ctrl-C way, not with a worker traceback.
    run = tmp_path / "run"
    # Output to files: a pipe nobody reads until the end could fill up and stall train.py.
    stdout, stderr = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "--data", str(prepared), "--epochs", "50",
         "--batch-size", "16", "--workers", "1", "--patience", "50", "--out", str(run)],
        cwd=ROOT, stdout=stdout, stderr=stderr, start_new_session=True,
    )  # fmt: skip
    # Past epoch 1's line (printed after its files and plot; a signal in the middle of the
    # first matplotlib import surfaces as a RuntimeError, not as Ctrl-C), into epoch 2.
    deadline = time.time() + 120
    while "epoch   1 " not in (tmp_path / "out.txt").read_text() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch, workers busy
    # The workers first (a group signal reaches them in no set order): were they to die of it,
    # the main process would stop with "DataLoader worker is killed by signal".
    workers = children(proc.pid)
    assert workers, "no loader worker to signal"
    for worker in workers:
        os.kill(worker, signal.SIGTERM)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    stdout.close(), stderr.close()
    out, err = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted:" in out and "Traceback" not in err
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] >= 1
    deadline = time.time() + 10  # and the workers, which ignored the signal, ended with it
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers)


def test_threshold_gives_every_validation_source_equal_say():
    import numpy as np

    prob = np.r_[[0.1] * 9, 0.62, 0.6, [0.9] * 9]
    labels = np.r_[[0] * 10, [1] * 10]
    sources = ["big_real"] * 9 + ["small_real"] + ["gan"] * 10
    # Per class, calling the one small-source real fake costs as much as missing one fake ...
    assert calibrate.choose_threshold(prob, labels) == pytest.approx(0.35)
    # ... per source it costs a whole source, so the threshold moves above it.
    assert calibrate.choose_threshold(prob, labels, sources) == pytest.approx(0.76)


def test_threshold_keeps_many_fake_sources_from_outvoting_the_real_ones():
    import numpy as np

    # One real source with photos at 0.55 and 0.65, three fake sources: two sure (0.95), one
    # weak (0.62 x 7, 0.9 x 3). Threshold 0.585 catches every fake and half the photos;
    # 0.775 gets every photo and 3 of the weak fakes. Averaged over the four sources the
    # fakes outvote the photos (0.875 vs 0.825); per class 0.775 wins (0.883 vs 0.75).
    prob = np.r_[[0.55] * 5, [0.65] * 5, [0.95] * 20, [0.62] * 7, [0.9] * 3]
    labels = np.r_[[0] * 10, [1] * 30]
    sources = ["photo"] * 10 + ["gan_a"] * 10 + ["gan_b"] * 10 + ["gan_c"] * 10
    assert calibrate.choose_threshold(prob, labels, sources) == pytest.approx(0.775)
    assert calibrate.choose_threshold(prob, labels, sources, per_class=False) == pytest.approx(
        0.585
    )


def test_robust_threshold_keeps_perturbed_fakes_above_it(monkeypatch):
    # Stand-ins: the "model" scores an image by its brightness, every perturbation darkens by
    # 100, so perturbed fakes score 0.39-0.43 while clean ones score 0.78-0.82.
    import numpy as np

    import common
    import model

    monkeypatch.setattr(model, "predict", lambda m, x, d: (x.float().mean((1, 2, 3)) / 255, None))
    monkeypatch.setattr(common, "perturb", lambda x, name: (x.int() - 100).clamp(0, 255).byte())
    values = [50, 60, 200, 210]
    images = torch.tensor(values, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 4, 4)
    labels = np.array([0, 0, 1, 1])
    sources = ["lfw", "lfw", "gan", "gan"]
    clean_only = calibrate.choose_threshold(np.array(values) / 255, labels, sources)
    assert clean_only == pytest.approx((60 + 200) / 2 / 255)  # perfect on clean, nearest 0.5
    threshold, clean_accuracy, _ = calibrate.robust_threshold(None, images, labels, sources, "cpu")
    assert 60 / 255 < threshold < 100 / 255  # below the perturbed fakes, above the reals
    assert clean_accuracy == 1.0


def test_augmentation_probabilities_are_honoured():
    # A textured image: JPEG must change it, a flip alone must not beyond mirroring.
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    mirrors = (image, image.flip(-1))
    never = train.train_transform(64, degrade_p=0.0, jpeg_p=0.0, min_crop=1.0)
    always_jpeg = train.train_transform(64, degrade_p=0.0, jpeg_p=1.0, min_crop=1.0)
    torch.manual_seed(0)
    for _ in range(8):
        untouched, compressed = never(image), always_jpeg(image)
        assert any(torch.equal(untouched, m) for m in mirrors)
        assert not any(torch.equal(compressed, m) for m in mirrors)
    # Runs from before --jpeg-p re-compressed with --degrade-p; resuming one keeps doing so.
    legacy = train.saved_train_args({"train_args": {"degrade_p": 1.0}})
    assert (
        train.train_transform(64, legacy["degrade_p"], legacy["jpeg_p"], 1.0).transforms[-1].p
        == 1.0
    )


def test_unsure_band_reaches_the_precision_with_the_narrowest_band():
    rng = np.random.default_rng(0)
    prob = np.r_[rng.uniform(0, 0.6, 2000), rng.uniform(0.4, 1, 2000)]
    labels = np.r_[np.zeros(2000, int), np.ones(2000, int)]
    # The precision rule alone (tests/test_calibrate.py adds the cap on reals called fake).
    low, high, stats = calibrate.unsure_band(
        prob, labels, 0.5, precision=0.95, max_real_called_fake=None
    )
    assert low < 0.5 < high
    assert (labels[prob >= high] == 1).mean() >= 0.95 and (labels[prob < low] == 0).mean() >= 0.95
    # nothing narrower reaches it: one step closer to the threshold falls short
    closer_high = prob[(prob < high) & (prob >= 0.5)].max()
    assert (labels[prob >= closer_high] == 1).mean() < 0.95
    closer_low = prob[(prob > low) & (prob <= 0.5)].min()
    assert (labels[prob < closer_low] == 0).mean() < 0.95 or closer_low > 0.5
    assert stats["fake_precision"] >= 0.95 and 0 < stats["unsure_share"] < 1
    # separable classes: no band at all
    low, high, stats = calibrate.unsure_band(
        np.r_[prob[:2000] * 0.5, 0.5 + prob[2000:] * 0.5], labels, 0.5
    )
    assert low == high == 0.5 and stats["unsure_share"] == 0


def test_decision_rule():
    assert calibrate.decision(0.7, 0.5, [0.3, 0.6]) == "fake"
    assert calibrate.decision(0.6, 0.5, [0.3, 0.6]) == "fake"
    assert calibrate.decision(0.45, 0.5, [0.3, 0.6]) == "unsure"
    assert calibrate.decision(0.55, 0.5, [0.3, 0.6]) == "unsure"
    assert calibrate.decision(0.29, 0.5, [0.3, 0.6]) == "real"
    assert calibrate.decision(0.5, 0.5, [0.5, 0.5]) == "fake"  # no band: the plain threshold
    assert calibrate.decision(0.4999, 0.5, [0.5, 0.5]) == "real"
    # A threshold typed by hand outside the band widens it rather than contradicting it.
    assert calibrate.decision(0.65, 0.7, [0.3, 0.6]) == "unsure"
    assert calibrate.decision(0.25, 0.2, [0.3, 0.6]) == "unsure"


def test_calibrate_imports_without_torch():
    # infer.py takes decision() from calibrate on devices that have numpy but no torch.
    code = ("import sys; sys.modules['torch'] = None; import calibrate; "
            "print(calibrate.decision(0.9, 0.5, [0.4, 0.6]))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fake"


def test_calibrate_cli_redoes_the_end_of_training_step(tmp_path, tiny_runs):
    # A run whose threshold and band were lost (or made under an older rule): calibrate.py
    # puts back exactly what train.py's end of training wrote.
    finished = torch.load(tiny_runs["on"] / "best.pt", weights_only=True)
    stale = {**finished, "threshold": 0.5, "threshold_rule": "old"}
    stale["val_metrics"] = {
        k: v for k, v in finished["val_metrics"].items() if k != "confident_calls"
    }
    del stale["unsure_band"]
    torch.save(stale, tmp_path / "best.pt")
    result = subprocess.run([sys.executable, str(ROOT / "calibrate.py"), str(tmp_path / "best.pt"),
                             "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
    redone = torch.load(tmp_path / "best.pt", weights_only=True)
    for key in ("threshold", "threshold_rule", "unsure_band", "val_metrics"):
        assert redone[key] == finished[key], key
    low, high = finished["unsure_band"]
    assert (
        f"threshold {finished['threshold']:.4f}, unsure band {low:.4f}-{high:.4f}" in result.stdout
    )
    # A file that is no checkpoint: one line, no traceback.
    (tmp_path / "junk.pt").write_bytes(b"junk")
    result = subprocess.run([sys.executable, str(ROOT / "calibrate.py"), str(tmp_path / "junk.pt")],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode != 0 and result.stderr.startswith("error:")
    assert "Traceback" not in result.stderr


def test_early_stopping_and_best_pt_read_the_logged_validation_loss(tmp_path, prepared):
    # Whatever the training loss, best.pt is the epoch of the lowest val_loss in history.csv
    # (the plain cross-entropy on validation) and early stopping counts on that same number.
    run = tmp_path / "focal"
    train.main(["--data", str(prepared), "--out", str(run), "--loss", "focal", "--epochs", "4",
                "--patience", "1", "--batch-size", "16", "--workers", "0", "--seed", "1",
                "--device", "cpu"])  # fmt: skip
    history = read_history(run)
    losses = [float(h["val_loss"]) for h in history]
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["val_metrics"]["loss"] == pytest.approx(min(losses), rel=1e-5)
    assert int(history[losses.index(min(losses))]["epoch"]) == best["epoch"]
    stopper = train.EarlyStopping(patience=1)
    stopped = [stopper.step(v) for v in losses]
    assert stopped[-1] and not any(stopped[:-1]) or (len(losses) == 4 and not any(stopped))


def test_native_resolution_blurs_only_to_a_smaller_drawn_side():
    # A checkerboard at full detail: drawn side 16 of 64 must wash it out, 64 or more not touch it.
    board = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 255
    image = board.to(torch.uint8).expand(3, 64, 64).contiguous()
    assert torch.equal(train.NativeResolution([64, 200])(image), image)
    softened = train.NativeResolution([16])(image)
    assert softened.shape == image.shape
    assert softened.float().std() < 0.2 * image.float().std()


def test_new_augmentations_off_leave_the_draws_as_before():
    # The options off must build the very chain of before (same steps, same random draws), so a
    # default run trains exactly as it did; on, they are in the chain.
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    plain = train.train_transform(64, 0.5, 0.5, 0.5, 0.5)
    assert [type(t).__name__ for t in plain.transforms] == [
        "RandomHorizontalFlip", "RandomResizedCrop", "RandomApply", "RandomApply", "RandomApply"
    ]  # fmt: skip
    everything = train.train_transform(
        64, 0.5, 0.5, 0.5, 0.5, native_sides=[20, 40], native_p=1.0, rotate=10, colour=0.2,
        mask_p=0.5, noise_p=0.5, double_jpeg_p=0.5, kernel_p=0.5,
    )  # fmt: skip
    names = [type(t).__name__ for t in everything.transforms]
    assert {"RandomRotation", "ColorJitter", "RandomErasing"} <= set(names)
    applied = [t for t in everything.transforms if type(t).__name__ == "RandomApply"]
    inner = [type(t.transforms[0]).__name__ for t in applied]
    assert {"PixelNoise", "RandomChoice"} <= set(inner) and inner.count("JPEG") == 2
    assert names[-1] == "RandomApply" and everything.transforms[-1].p == 0.5  # JPEG stays last
    torch.manual_seed(1)
    out = everything(image)
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_pixel_noise_stays_uint8_and_adds_a_few_grey_levels():
    grey = torch.full((3, 64, 64), 128, dtype=torch.uint8)
    torch.manual_seed(0)
    noisy = train.PixelNoise()(grey)
    assert noisy.dtype == torch.uint8 and noisy.shape == grey.shape
    spread = (noisy.float() - 128).std()
    assert 0.8 < spread < 6.5  # sigma is drawn from 1-6 grey levels
    white = train.PixelNoise()(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    assert white.max() == 255  # clamped, not wrapped round to black


def test_residual_blocks_change_the_model_and_old_checkpoints_still_load():
    plain = FaceCheckNet({"attention": False})
    deeper = FaceCheckNet({"attention": False, "residual_blocks": 1})
    assert count_parameters(deeper) > count_parameters(plain)
    assert deeper(torch.rand(2, 3, 128, 128)).shape == (2, 2)
    # A config without the key (every checkpoint from before it) builds the plain stages.
    assert FaceCheckNet({"attention": False}).state_dict().keys() == plain.state_dict().keys()


def test_source_adversary_reverses_its_gradient_and_names_sources_within_the_class():
    x = torch.randn(4, 8, requires_grad=True)
    train.ReverseGradient.apply(x, 0.3).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, -0.3))
    # Sources 0, 1 real and 2 fake: a real face's logits for the fake source are -inf, so its
    # loss is a choice between the real sources only.
    adversary = train.SourceAdversary(8, [0, 0, 1])
    logits = adversary(torch.randn(3, 8), torch.tensor([0, 0, 1]), 1.0)
    assert torch.isinf(logits[:2, 2]).all() and torch.isinf(logits[2, :2]).all()
    assert torch.isfinite(logits[:2, :2]).all() and torch.isfinite(logits[2, 2])
    loss = F.cross_entropy(logits, torch.tensor([1, 0, 2]))
    assert torch.isfinite(loss) and loss.item() > 0
    # What reaches the features is the head's own gradient, reversed and scaled.
    pooled = torch.randn(3, 8, requires_grad=True)
    F.cross_entropy(
        adversary(pooled, torch.tensor([0, 0, 1]), 0.5), torch.tensor([1, 0, 2])
    ).backward()
    plain = pooled.detach().clone().requires_grad_(True)
    head = adversary.head(plain).masked_fill(torch.isinf(logits), float("-inf"))
    F.cross_entropy(head, torch.tensor([1, 0, 2])).backward()
    assert torch.allclose(pooled.grad, -0.5 * plain.grad)


def test_source_adversary_trains_resumes_exactly_and_stays_out_of_the_model(
    tmp_path, prepared, monkeypatch
):
    common = ["--data", str(prepared), "--epochs", "2", "--batch-size", "16", "--workers", "0",
              "--seed", "2", "--patience", "10", "--device", "cpu"]  # fmt: skip
    train.main([*common, "--out", str(tmp_path / "plain")])
    train.main([*common, "--out", str(tmp_path / "straight"), "--source-adversary", "1"])
    history = read_history(tmp_path / "straight")
    assert all(0 <= float(h["adversary_acc"]) <= 1 for h in history)
    assert all(h["adversary_acc"] == "" for h in read_history(tmp_path / "plain"))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    plain = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)
    assert set(straight["model"]) == set(plain["model"])  # the head is not in the model
    assert plain["adversary"] is None and "head.weight" in straight["adversary"]

    # Stopped after epoch 1 (Ctrl-C), then resumed: the same weights as the straight run.
    real_print = train.print_epoch

    def stop_after_first(row, best):
        real_print(row, best)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "print_epoch", stop_after_first)
    run = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        train.main([*common, "--out", str(run), "--source-adversary", "1"])
    monkeypatch.setattr(train, "print_epoch", real_print)
    train.main(["--resume", str(run / "last.pt"), "--workers", "0", "--device", "cpu"])
    resumed = torch.load(run / "last.pt", weights_only=True)
    for part in ("model", "adversary"):
        for key in straight[part]:
            assert torch.allclose(straight[part][key].float(), resumed[part][key].float(),
                                  atol=1e-5), (part, key)  # fmt: skip
