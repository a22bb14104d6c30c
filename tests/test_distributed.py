"""train.py under torchrun (two CPU processes, gloo) on the tiny synthetic dataset: killed after
an epoch and resumed, its files stay whole; and one process with one seed repeats itself."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

TINY = ["--epochs", "4", "--batch-size", "16", "--workers", "0", "--seed", "5",
        "--patience", "10", "--device", "cpu", "--threads", "1"]  # fmt: skip
HISTORY_METRICS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc"]


def read_history(run):
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def processes_with(text):
    """PIDs of this machine's processes whose command line contains text (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:  # gone meanwhile
            pass
    return [pid for pid in pids if pid != os.getpid()]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", str(ROOT / "train.py"), *args]  # fmt: skip


def test_torchrun_killed_after_an_epoch_then_resumed_leaves_whole_files(tmp_path, prepared):
    import model

    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(torchrun("--data", str(prepared), "--out", str(run), *TINY), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "history.csv").exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    # SIGKILL to torchrun and both workers at once, like a machine going away: no handler
    # runs, only the atomic writes protect the files. (torchrun starts its workers in sessions
    # of their own, so killing its process group would leave them training on.)
    for pid in processes_with(str(run)):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while processes_with(str(run)) and time.time() < deadline:
        time.sleep(0.05)
    assert not processes_with(str(run))

    done = read_history(run)
    assert 1 <= len(done) < 4 and all(row["val_loss"] for row in done)  # some left to resume
    _, last = model.load_checkpoint(run / "last.pt")  # whole, loadable, resumable
    assert last["epoch"] >= 1 and "optimizer" in last
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temp files

    result = subprocess.run(torchrun("--resume", str(run / "last.pt")), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_history(run)
    assert [int(h["epoch"]) for h in history] == [1, 2, 3, 4]
    _, best = model.load_checkpoint(run / "best.pt")
    assert best["run_device"] == {"type": "cpu", "world_size": 2, "precision": "fp32",
                                  "threads": 1}  # fmt: skip
    assert "unsure_band" in best  # the end-of-training step ran once, on rank 0
    assert best["train_args"]["batch_size"] == 16  # the global batch: 8 per process
    # It trained (the tiny set learns slowly: one process and two both reach ~0.65 validation
    # accuracy only after 8 epochs, so the loss, not the accuracy, is what can be checked).
    losses = [float(h["train_loss"]) for h in history]
    assert min(losses[2:]) < losses[0]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 4 - len(done), result.stdout  # rank 0 prints, the other does not


def test_same_seed_gives_the_same_split_and_metrics_twice(tmp_path, raw_tree):
    import prepare_data
    import train

    manifests, histories = [], []
    for attempt in ("a", "b"):
        data = tmp_path / attempt / "data"
        prepare_data.main([
            "--real", str(raw_tree / "real" / "camera"), str(raw_tree / "real" / "people"),
            "--fake", str(raw_tree / "fake" / "ganA"), str(raw_tree / "fake" / "ganB"),
            "--out", str(data), "--size", "32", "--faces", "whole", "--workers", "2",
        ])  # fmt: skip
        with open(data / "manifest.csv", newline="") as f:
            manifests.append([(r["path"], r["split"]) for r in csv.DictReader(f)])
        run = tmp_path / attempt / "run"
        train.main(["--data", str(data), "--out", str(run), "--epochs", "2", *TINY[2:]])
        histories.append([{k: h[k] for k in HISTORY_METRICS} for h in read_history(run)])
    assert manifests[0] == manifests[1]
    assert {split for _, split in manifests[0]} == {"train", "val", "test"}
    assert histories[0] == histories[1]
    a = torch.load(tmp_path / "a" / "run" / "best.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "best.pt", weights_only=True)
    assert a["threshold"] == b["threshold"] and a["val_metrics"] == b["val_metrics"]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_cover_one_draw_once(world):
    import train

    def shard(rank, world):  # every process seeds its own generator alike
        generator = torch.Generator().manual_seed(0)
        draw = torch.utils.data.RandomSampler(range(10), generator=generator)
        return list(train.SeededShard(draw, generator, rank, world))

    whole = shard(0, 1)
    shards = [shard(rank, world) for rank in range(world)]
    assert all(len(s) == len(shards[0]) == 10 // world for s in shards)  # equal steps per rank
    # Together the processes take the one-process draw once, each index with the same seed.
    assert sorted(sum(shards, [])) == sorted(whole[: 10 // world * world])
    assert sorted(i for i, _ in whole) == list(range(10))
    assert len({seed for _, seed in whole}) == 10


def test_torchrun_with_a_source_adversary_trains_and_saves_it(tmp_path, prepared):
    """The adversary is a second DDP module: two processes train with it and rank 0 saves its
    state in last.pt, the model's keys unchanged."""
    import model

    run = tmp_path / "ddp-adversary"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--data", str(prepared), "--out", str(run), "--source-adversary", "1",
            "--epochs", "2", *TINY[2:]]  # fmt: skip
    result = subprocess.run(torchrun(*args), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(0 <= float(h["adversary_acc"]) <= 1 for h in read_history(run))
    _, last = model.load_checkpoint(run / "last.pt")
    assert set(last["adversary"]) == {"head.weight", "head.bias", "source_class"}
    assert set(last["model"]) == set(model.FaceCheckNet(last["config"]).state_dict())
