"""Train FaceCheckNet on a dataset made by prepare_data.py.

    python train.py --attention off              # -> runs/attention-off/best.pt
    python train.py --attention on --seed 1 --out runs/on-s1
    python train.py --resume runs/attention-off/last.pt
    torchrun --nproc_per_node 4 train.py --out runs/big     # one process per GPU (DDP)

Class-weighted cross-entropy (or focal loss) on source-balanced draws (every source of a class
drawn equally often, so small sources are not drowned by large ones), the same augmentation for
both classes (flip, a random framing of the stored face crop, random down-and-up scaling, JPEG
re-compression, blur), AdamW with a one-cycle schedule, early stopping on the validation loss.
The run folder gets best.pt (lowest validation loss), last.pt (every epoch, atomically: Ctrl-C,
SIGTERM or a lost machine leave a run that --resume continues exactly), history.csv and
curves.png. At the end calibrate.finish_best sets best.pt's decision threshold and unsure band
on validation. Every checkpoint carries the model config, the data manifest's hash, the
settings and where it trained, so the other scripts need nothing but the file. On CUDA it
trains in mixed precision (bf16, or fp16 with a gradient scaler), channels-last; under
torchrun every process trains on its share of each draw with --batch-size / processes images
per step (the global batch and schedule stay those of one process) and rank 0 writes the files.
"""

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision.transforms import v2
from tqdm import tqdm

from calibrate import choose_threshold, finish_best
from common import (
    CLASS_NAMES,
    amp_dtype,
    atomic_write,
    load_split,
    manifest_hash,
    pick_device,
    precision_name,
    read_summary,
    to_model_input,
)
from model import (
    CHECKPOINT_VERSION,
    DEFAULT_CONFIG,
    CheckpointError,
    FaceCheckNet,
    count_flops,
    count_parameters,
    load_checkpoint,
    predict,
    save_checkpoint,
)

HISTORY_FIELDS = [
    "epoch",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "seconds",
    "images_per_s",
    "adversary_acc",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # fmt: off
    p.add_argument("--attention", choices=["on", "off"], default="off", help="the spatial self-attention layer (default off)")
    p.add_argument("--data", default="data/faces", help="prepared dataset folder (default data/faces)")
    p.add_argument("--out", default=None, help="run folder (default runs/attention-<on|off>)")
    p.add_argument("--epochs", type=int, default=20, help="maximum epochs (default 20)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over torchrun's processes (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule (default 3e-3)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument("--loss", choices=["weighted-ce", "focal"], default="weighted-ce", help="class-weighted cross-entropy or focal loss (default weighted-ce)")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (default 2)")
    p.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a lower validation loss (default 5)")
    p.add_argument("--sampler", choices=["uniform", "source-balanced"], default="source-balanced", help="how training images are drawn (default source-balanced)")
    p.add_argument("--width", type=float, default=1.0, help="multiply the model's channel widths (default 1)")
    p.add_argument("--degrade-p", type=float, default=0.6, help="probability of Gaussian blur per training image (default 0.6)")
    p.add_argument("--jpeg-p", type=float, default=0.7, help="probability of JPEG re-compression per training image (default 0.7)")
    p.add_argument("--min-crop", type=float, default=0.4, help="smallest share of the stored crop a random crop keeps (default 0.4)")
    p.add_argument("--rescale-p", type=float, default=0.5, help="probability of random down-and-up scaling per training image (default 0.5)")
    p.add_argument("--native-p", type=float, default=0.0, help="probability of showing a face at a real face's native resolution (default 0)")
    p.add_argument("--rotate", type=float, default=0.0, help="random rotation up to this many degrees (default 0: off)")
    p.add_argument("--colour", type=float, default=0.0, help="colour jitter strength, brightness/contrast/saturation (default 0: off)")
    p.add_argument("--mask-p", type=float, default=0.0, help="probability of blanking a random patch (default 0)")
    p.add_argument("--noise-p", type=float, default=0.0, help="probability of Gaussian pixel noise (default 0)")
    p.add_argument("--double-jpeg-p", type=float, default=0.0, help="probability of a first JPEG before the crop (default 0)")
    p.add_argument("--kernel-p", type=float, default=0.0, help="probability of rescaling with a random kernel (default 0)")
    p.add_argument("--source-adversary", type=float, default=0.0, help="weight of the reversed-gradient source loss (default 0: off)")
    p.add_argument("--residual-blocks", type=int, default=0, help="residual blocks per stage; 0 = the plain stages (default 0)")
    p.add_argument("--stem-stride", type=int, choices=[2, 4], default=2, help="first conv's stride: 4 runs 256 px data at 128 px cost (default 2)")
    p.add_argument("--attention-stage", type=int, choices=[1, 2], default=2, help="the attention layer after stage 2 or (finer, dearer) stage 1 (default 2)")
    p.add_argument("--no-highpass", action="store_true", help="drop the fixed high-pass input residual")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto (CUDA when present)")
    p.add_argument("--workers", type=int, default=None, help="loader processes per training process, 0 = none (default 1 on CPU, more on CUDA)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="on CUDA (CPU trains in fp32); auto: bf16, else fp16 (default auto)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch (default: its own choice)")
    p.add_argument("--resume", default=None, metavar="LAST_PT", help="continue a run from its last.pt")
    # fmt: on
    args = p.parse_args(argv)
    if args.out is None:
        args.out = f"runs/attention-{args.attention}"
    return args


def main(argv=None):
    args = parse_args(argv)
    resume = load_resume(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed(args.device)
    if args.batch_size % world:
        sys.exit(f"error: --batch-size {args.batch_size} does not split over {world} processes")
    if args.workers is None:
        args.workers = default_workers(device, world)
    set_seed(args.seed + rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(Path(args.data), progress=rank == 0)  # one progress bar, not one each

    config = model_config(args, data.size)
    model = build_model(config, device, world)  # the plain module: validation, checkpoints
    amp = amp_dtype(device, args.precision)
    loader, generator = build_loader(args, data, rank, world, device)
    adversary = None
    if args.source_adversary > 0:
        adversary = SourceAdversary(config["widths"][-1], data.source_class).to(device)
    params = [*model.parameters(), *(adversary.parameters() if adversary is not None else [])]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    trained = model  # what the steps go through: under torchrun DDP, which syncs the gradients
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        trained = DDP(model, device_ids=ids)
        if adversary is not None:
            adversary = DDP(adversary, device_ids=ids)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(loader), pct_start=0.15
    )
    # fp16 needs loss scaling against underflow; bf16 (fp32's exponent range) does not.
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    weights = class_weights(data.train_labels).to(device)
    if args.loss == "focal":
        criterion = partial(focal_loss, weight=weights, gamma=args.focal_gamma)
    else:
        criterion = torch.nn.CrossEntropyLoss(weight=weights)
    # Early stopping, best.pt and history.csv read one validation loss: the plain cross-entropy
    # (validation is balanced), the same number whatever --loss trains with.
    val_criterion = torch.nn.CrossEntropyLoss()
    # Before any RNG state is restored: building the model to count its FLOPs draws numbers.
    run = run_facts(args, data, config, model, device, world, amp)
    start_epoch, history, stopper = 1, [], EarlyStopping(args.patience)
    if resume:
        start_epoch, history, stopper = restore(
            resume, model, optimizer, scheduler, scaler, generator, args, rank, adversary
        )
    if rank == 0:
        print_setup(args, data, run, device, weights)

    def resumable():  # what last.pt needs beyond best.pt to continue the run exactly
        return training_state(optimizer, scheduler, scaler, generator, history, stopper, adversary)

    signal.signal(signal.SIGTERM, stop_like_ctrl_c)  # a scheduler's SIGTERM stops like Ctrl-C
    if rank == 0 and start_epoch == 1:  # from the first moment on, last.pt can resume
        save_checkpoint(out / "last.pt", checkpoint(run, model, 0, history, {}, 0.5, resumable()))
    completed = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            started = time.time()
            train_loss, train_acc, seen, adversary_acc = train_one_epoch(
                trained, loader, criterion, optimizer, scheduler, scaler, amp, device, epoch, args,
                adversary,
            )  # fmt: skip
            prob, val_logits = validate(model, data.val_images, device, args.precision, rank, world)
            seconds = time.time() - started
            val_loss = val_criterion(val_logits, data.val_labels).item()
            val_acc = ((prob >= 0.5).long() == data.val_labels).float().mean().item()
            stop = stopper.step(val_loss)
            history.append({
                "epoch": epoch, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
                "seconds": seconds, "images_per_s": seen / seconds, "adversary_acc": adversary_acc,
            })  # fmt: skip
            if rank == 0:  # the files, each written atomically
                if stopper.improved:
                    threshold = choose_threshold(prob, data.val_labels, data.val_sources)
                    at_threshold = ((prob >= threshold).long() == data.val_labels).float().mean()
                    metrics = {"loss": val_loss, "accuracy": val_acc,
                               "accuracy_at_threshold": at_threshold.item()}  # fmt: skip
                    best = checkpoint(run, model, epoch, history, metrics, threshold)
                    save_checkpoint(out / "best.pt", best)
                metrics = {"loss": val_loss, "accuracy": val_acc}
                last = checkpoint(run, model, epoch, history, metrics, 0.5, resumable())
                save_checkpoint(out / "last.pt", last)
                write_history(out / "history.csv", history)
                plot_curves(history, out / "curves.png")
                print_epoch(history[-1], stopper.improved)
            completed = epoch
            if stop:
                if rank == 0:
                    print(f"early stop: no lower validation loss for {args.patience} epochs")
                break
    except KeyboardInterrupt:
        if rank == 0:  # last.pt already holds the last finished epoch
            print(
                f"\ninterrupted: {out / 'last.pt'} holds epoch {completed}; continue with: "
                f"{'torchrun ... ' if world > 1 else 'python '}train.py --resume {out / 'last.pt'}"
            )
        sys.exit(130)

    if rank == 0:  # the threshold over clean and perturbed validation copies, the unsure band
        best = finish_best(
            out / "best.pt", data.val_images, data.val_labels.numpy(), data.val_sources, device
        )
        print_summary(best, history, out / "best.pt")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def train_one_epoch(
    trained, loader, criterion, optimizer, scheduler, scaler, amp, device, epoch, args,
    adversary=None,
):  # fmt: skip
    """One pass over the sampler's draw; loss and accuracy summed over every process (and,
    with a source adversary, how often it named a face's source: None without one)."""
    trained.train()
    total_loss, correct, seen, named = 0.0, 0, 0, 0
    rank = dist.get_rank() if dist.is_initialized() else 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, unit="batch",
               disable=rank != 0)  # fmt: skip
    for step, (images, labels, sources) in enumerate(bar):
        x = to_model_input(images).to(device, non_blocking=True)
        y = labels.to(device, non_blocking=True)
        if device.type == "cuda":
            x = x.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, pooled = trained(x, with_pooled=True)
        logits = logits.float()
        class_loss = loss = criterion(logits, y)
        if adversary is not None:
            # DANN's ramp (Ganin & Lempitsky 2015): no reversal at first, when the features
            # are noise, rising to the full weight as training goes on.
            progress = ((epoch - 1) * len(loader) + step) / (args.epochs * len(loader))
            strength = args.source_adversary * (2 / (1 + np.exp(-10 * progress)) - 1)
            s = sources.to(device, non_blocking=True)
            source_logits = adversary(pooled.float(), y, strength)
            loss = loss + F.cross_entropy(source_logits, s)
            named += (source_logits.argmax(1) == s).sum().item()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += class_loss.item() * len(y)  # the real/fake loss, comparable across runs
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    total_loss, correct, seen, named = all_sum([total_loss, correct, seen, named], device)
    return total_loss / seen, correct / seen, seen, named / seen if adversary is not None else None


def all_sum(values, device):
    """Sum of values over every process (the values themselves in a world of one)."""
    if not dist.is_initialized():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def validate(model, images, device, precision, rank, world):
    """prob_fake and logits of every validation image. Under DDP each process scores its share
    and all gather; the BatchNorm statistics are rank 0's first (DDP trains on them, but every
    process updated its own copy in its last step), so every process scores the same model."""
    if world == 1:
        return predict(model, images, device, precision=precision)
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
    _, logits = predict(model, images[rank::world], device, precision=precision)
    parts = [None] * world
    dist.all_gather_object(parts, logits)
    logits = torch.empty(len(images), logits.shape[1])
    for part_rank, part in enumerate(parts):
        logits[part_rank::world] = part
    return logits.softmax(1)[:, 1], logits


def build_model(config, device, world):
    model = FaceCheckNet(config).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if world > 1:
            # Batch norm over the global batch, not each GPU's slice of it: with 8 GPUs and a
            # batch of 64 each would normalise over 8 faces (measured on CPU, where SyncBatchNorm
            # does not run: 8 faces per process cost 16 points of validation accuracy on the
            # tiny test set, 16 did not). Same state_dict keys, so checkpoints do not change.
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def run_facts(args, data, config, model, device, world, amp):
    """What every checkpoint of the run carries besides its weights: the model config, the
    data it trained on (framing, manifest hash), the code, the settings and where it trained."""
    where = {"type": device.type, "world_size": world, "precision": precision_name(amp)}
    if device.type == "cuda":
        where["name"] = torch.cuda.get_device_name(device)
    else:
        where["threads"] = torch.get_num_threads()
    return {
        "format": "facecheck",
        "version": CHECKPOINT_VERSION,
        "config": {
            **config,
            "widths": list(config["widths"]),
            "mean": list(config["mean"]),
            "std": list(config["std"]),
        },
        "class_names": list(CLASS_NAMES),
        "image_size": data.size,
        "faces": data.faces,  # how prepare_data.py framed the data: infer.py must do the same
        "manifest_sha256": data.manifest_sha256,
        "data": str(data.dir),
        "git_commit": git_commit(),
        "params": count_parameters(model),
        "flops": count_flops(FaceCheckNet(config)),
        "train_args": dict(vars(args)),
        "run_device": where,
    }


def checkpoint(run, model, epoch, history, val_metrics, threshold, resumable=None):
    """best.pt (resumable None) or last.pt: the run's facts, the weights of this epoch and the
    clean-validation threshold (finish_best replaces best.pt's at the end)."""
    return {
        **run,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "threshold": threshold,
        "threshold_rule": "validation, clean (until training ends)",
        "epoch": epoch,
        "val_metrics": val_metrics,
        "train_seconds": sum(h["seconds"] for h in history),
        **(resumable or {}),
    }


def training_state(optimizer, scheduler, scaler, generator, history, stopper, adversary=None):
    return {
        "adversary": _plain(adversary).state_dict() if adversary is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler_rng": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "best_val_loss": stopper.best,
        "bad_epochs": stopper.bad_epochs,
    }


def restore(resume, model, optimizer, scheduler, scaler, generator, args, rank, adversary=None):
    """Put a last.pt's weights, optimizer, schedule, sampler and RNG states back; returns
    (the first epoch to run, the history so far, the early stopping's state)."""
    model.load_state_dict(resume["model"])
    if adversary is not None:
        _plain(adversary).load_state_dict(resume["adversary"])
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    if "scaler" in resume:
        scaler.load_state_dict(resume["scaler"])
    generator.set_state(resume["sampler_rng"])
    torch.set_rng_state(resume["torch_rng"])  # rank 0's; the others reseed from their rank
    if rank:
        torch.manual_seed(args.seed + 1_000_003 * rank + resume["epoch"])
    if rank == 0:
        print(f"resumed {args.resume} at epoch {resume['epoch'] + 1}")
    stopper = EarlyStopping(args.patience, resume["best_val_loss"], resume["bad_epochs"])
    return resume["epoch"] + 1, resume["history"], stopper


def print_setup(args, data, run, device, weights):
    labels = data.train_labels
    print(
        f"model: attention {args.attention}, {run['params']:,} parameters, "
        f"{run['flops'] / 1e6:.0f} MFLOPs/image; device {device} x "
        f"{run['run_device']['world_size']}, {run['run_device']['precision']}, {args.workers} "
        f"loader workers; train {len(labels)} ({(labels == 0).sum()} real, "
        f"{(labels == 1).sum()} fake), val {len(data.val_labels)}; class weights "
        f"{[round(w, 3) for w in weights.tolist()]}"
    )


def print_epoch(row, best):
    print(
        f"epoch {row['epoch']:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}  {row['seconds']:.0f}s "
        f"({row['images_per_s']:.0f} img/s)"
        + (
            f"  source named {row['adversary_acc']:.3f}"
            if row.get("adversary_acc") is not None
            else ""
        )
        + ("  *best" if best else ""),
        flush=True,
    )


def print_summary(best, history, path):
    total = sum(h["seconds"] for h in history)
    print(
        f"best epoch {best['epoch']}: val loss {best['val_metrics']['loss']:.4f}, val acc "
        f"{best['val_metrics']['accuracy']:.4f} (at threshold {best['threshold']:.3f}: "
        f"{best['val_metrics']['accuracy_at_threshold']:.4f}); {total / 60:.1f} min of "
        f"training; saved {path}"
    )


def build_loader(args, data, rank, world, device):
    """Augmented, source-balanced (or uniform) batches of batch_size / world per process; the
    generator that draws them and their augmentation seeds is saved in last.pt."""
    generator = torch.Generator().manual_seed(args.seed)
    dataset = AugmentedImages(
        data.train_images,
        data.train_labels,
        train_transform(
            data.size,
            args.degrade_p,
            args.jpeg_p,
            args.min_crop,
            args.rescale_p,
            native_sides=real_crop_sides(data),
            native_p=args.native_p,
            rotate=args.rotate,
            colour=args.colour,
            mask_p=args.mask_p,
            noise_p=args.noise_p,
            double_jpeg_p=args.double_jpeg_p,
            kernel_p=args.kernel_p,
        ),  # fmt: skip
        data.train_source_ids,
    )
    if args.sampler == "source-balanced":
        sampler = WeightedRandomSampler(
            source_balanced_weights(data.train_rows),
            len(dataset),
            replacement=True,
            generator=generator,
        )
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size // world,
        sampler=SeededShard(sampler, generator, rank, world),
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        # The loader draws its workers' base seed from this one, not from the sampler's
        # generator (a resumed run would draw it again and shift every later batch) nor from
        # the global RNG (dropout's); the augmentation does not use the base seed.
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=init_worker,
        pin_memory=device.type == "cuda",
    )
    return loader, generator


def real_crop_sides(data):
    """The real training faces' native resolution in stored pixels: the side of the photo's
    square that was stored, capped at the stored side (an upscaled crop has no more detail)."""
    stored = data.train_images.shape[-1]
    return [min(float(r["crop_side"]), stored) for r in data.train_rows
            if r["label"] == "real" and r.get("crop_side")] or [stored]  # fmt: skip


def load_data(data_dir, progress):
    """Train and validation crops, decoded once into memory (every process holds them)."""
    if not (data_dir / "manifest.csv").is_file():
        sys.exit(
            f"error: no dataset at {data_dir} (manifest.csv missing); run prepare_data.py first"
        )
    train_images, train_labels, train_rows = load_split(
        data_dir, "train", framing=None, progress=progress
    )
    val_images, val_labels, val_rows = load_split(data_dir, "val", progress=progress)
    sources = sorted({(r["label"], r["source"]) for r in train_rows})  # the adversary's classes
    index = {key: i for i, key in enumerate(sources)}  # by class too: a name in both stays two
    return SimpleNamespace(
        train_source_ids=torch.tensor([index[r["label"], r["source"]] for r in train_rows]),
        source_class=[CLASS_NAMES.index(label) for label, _ in sources],
        dir=data_dir,
        train_images=train_images,
        train_labels=train_labels,
        train_rows=train_rows,
        val_images=val_images,
        val_labels=val_labels,
        val_sources=[r["source"] for r in val_rows],
        size=val_images.shape[-1],  # the model's view of the stored crops
        faces=read_summary(data_dir).get("faces", "whole"),
        manifest_sha256=manifest_hash(data_dir),
    )


def model_config(args, size):
    return {
        **DEFAULT_CONFIG,
        "image_size": size,
        "attention": args.attention == "on",
        "widths": tuple(max(8, round(w * args.width)) for w in DEFAULT_CONFIG["widths"]),
        "highpass": not args.no_highpass,
        "stem_stride": args.stem_stride,
        "attention_stage": args.attention_stage,
        "residual_blocks": args.residual_blocks,
    }


class SeededShard(torch.utils.data.Sampler):
    """This process's share (draws rank, rank + world, ...) of a sampler every process draws
    identically (same seed, same generator), each index paired with a seed for its
    augmentation drawn from that same generator: the generator, saved in last.pt, is then the
    whole of the input pipeline's randomness. DistributedSampler can only shuffle uniformly;
    the training draw is source-balanced (weighted, with replacement), hence this wrapper."""

    def __init__(self, sampler, generator, rank, world):
        self.sampler, self.generator, self.rank, self.world = sampler, generator, rank, world

    def __iter__(self):
        indices = list(self.sampler)
        seeds = torch.randint(2**62, (len(indices),), generator=self.generator).tolist()
        end = len(indices) // self.world * self.world
        return iter(list(zip(indices, seeds))[self.rank : end : self.world])

    def __len__(self):
        return len(self.sampler) // self.world


def init_worker(worker_id):
    """Every loader worker: SIGTERM is left to the main process, which stops the run the Ctrl-C
    way (a scheduler signals the whole job; a worker dying of it first would end the run with
    a DataLoader error instead)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(device, world):
    """Augmentation is the input pipeline's cost: on CUDA every spare core works for the GPUs."""
    if device.type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // max(1, torch.cuda.device_count()) - 1))


def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(labels):
    """Inverse class frequency, scaled so a balanced set gets weight 1 per class."""
    counts = torch.bincount(labels, minlength=len(CLASS_NAMES)).float()
    if (counts == 0).any():
        missing = [CLASS_NAMES[i] for i in range(len(counts)) if counts[i] == 0]
        raise SystemExit(f"error: the train split has no {', '.join(missing)} images")
    return counts.sum() / (len(counts) * counts)


def focal_loss(logits, targets, weight=None, gamma=2.0):
    """Class-weighted focal loss (Lin et al. 2017), normalised like F.cross_entropy's
    weighted mean so that gamma = 0 gives exactly the weighted cross-entropy.
    torchvision.ops.sigmoid_focal_loss is the binary-sigmoid form, hence this one."""
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    w = weight[targets] if weight is not None else torch.ones_like(log_p)
    loss = -w * (1 - log_p.exp()).pow(gamma) * log_p
    return loss.sum() / w.sum()


def source_balanced_weights(rows):
    """Sampling weight per train image: within each class every source is drawn equally
    often; the class totals keep their natural proportions."""
    per_source, per_class, sources_of = {}, {}, {}
    for r in rows:
        per_source[r["source"]] = per_source.get(r["source"], 0) + 1
        per_class[r["label"]] = per_class.get(r["label"], 0) + 1
        sources_of.setdefault(r["label"], set()).add(r["source"])
    return torch.tensor(
        [
            per_class[r["label"]] / len(sources_of[r["label"]]) / per_source[r["source"]]
            for r in rows
        ],
        dtype=torch.double,
    )


class EarlyStopping:
    """Counts epochs without a new lowest validation loss; .step() says whether to stop."""

    def __init__(self, patience, best=float("inf"), bad_epochs=0):
        self.patience, self.best, self.bad_epochs = patience, best, bad_epochs

    def step(self, val_loss):
        if val_loss < self.best - 1e-4:
            self.best, self.bad_epochs = val_loss, 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    @property
    def improved(self):
        return self.bad_epochs == 0


def train_transform(
    size, degrade_p, jpeg_p, min_crop, rescale_p=0.0, min_scale=0.35, *,
    native_sides=None, native_p=0.0, rotate=0.0, colour=0.0, mask_p=0.0,
    noise_p=0.0, double_jpeg_p=0.0, kernel_p=0.0,
):  # fmt: skip
    """Augmentation for both classes alike, on the stored crops: a random square of
    min_crop..1 of the stored area (the face framed between ~0.8x and 1.25x of the model's
    view, at a random place) resized to size; random down-and-up scaling (the sources run
    from ~70 px faces to 900 px ones: "upscaled = real" must not be an answer); JPEG and blur
    as in Wang et al. 2020, so the detector cannot key on one source's codec or sharpness.
    The options below are off by default and then leave the random draws exactly as before:
    native_p, every face at a resolution drawn from native_sides (the real training faces'
    own), so sharpness cannot tell the classes; rotate (degrees), colour (jitter strength) and
    mask_p (a random patch blanked, as SAFE, Li et al. KDD 2025) hide a source's framing,
    colour grading and any one local cue; noise_p (sensor-like noise), double_jpeg_p (a first
    JPEG on the stored grid, which the crop then shifts against the last one) and kernel_p (down
    and up with nearest, bilinear or bicubic) hide a source's own noise, codec history and
    resampling traces, so the traces a generator leaves must carry the call."""

    def down_up(kernel=v2.InterpolationMode.BILINEAR):
        return v2.Compose(
            [
                v2.RandomResize(round(min_scale * size), size + 1, interpolation=kernel),
                v2.Resize(size, interpolation=kernel),
            ]
        )

    steps = [v2.RandomHorizontalFlip()]
    if double_jpeg_p > 0:
        steps.append(v2.RandomApply([v2.JPEG(quality=(60, 95))], p=double_jpeg_p))
    if native_p > 0:
        steps.append(v2.RandomApply([NativeResolution(native_sides)], p=native_p))
    steps += [
        v2.RandomResizedCrop(size, scale=(min_crop, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomApply([down_up()], p=rescale_p),
    ]
    if kernel_p > 0:
        kernels = ("NEAREST", "BILINEAR", "BICUBIC")
        rescales = [down_up(v2.InterpolationMode[kernel]) for kernel in kernels]
        steps.append(v2.RandomApply([v2.RandomChoice(rescales)], p=kernel_p))
    if rotate > 0:
        steps.append(v2.RandomRotation(rotate))
    if colour > 0:
        steps.append(v2.ColorJitter(colour, colour, colour, hue=colour / 10))
    steps.append(v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.2, 1.2))], p=degrade_p))
    if mask_p > 0:
        steps.append(v2.RandomErasing(mask_p, scale=(0.02, 0.15), value=0))
    if noise_p > 0:
        steps.append(v2.RandomApply([PixelNoise()], p=noise_p))
    steps.append(v2.RandomApply([v2.JPEG(quality=(60, 95))], p=jpeg_p))
    return v2.Compose(steps)


class NativeResolution(torch.nn.Module):
    """Down to a side drawn from `sides` (when smaller than the image) and back up: the stored
    crop then carries the detail of a face photographed at that size. Fed the real training
    faces' native crop sides, both classes are seen at the reals' resolutions, so "large and
    sharp" stops meaning fake. Hand-written: torchvision draws sizes from a range, not a list."""

    def __init__(self, sides):
        super().__init__()
        self.sides = torch.as_tensor(sorted(sides), dtype=torch.float32)

    def forward(self, image):
        side = image.shape[-1]
        drawn = int(self.sides[torch.randint(len(self.sides), (1,))].round().clamp(min=16))
        if drawn >= side:
            return image
        small = v2.functional.resize(image, [drawn, drawn], antialias=True)
        return v2.functional.resize(small, [side, side], antialias=True)


class PixelNoise(torch.nn.Module):
    """Gaussian noise of a standard deviation drawn from 1-6 grey levels on a uint8 image.
    Hand-written: v2.GaussianNoise takes float images and one fixed sigma."""

    def forward(self, image):
        sigma = 1.0 + 5.0 * torch.rand(())
        noisy = image.float() + sigma * torch.randn(image.shape)
        return noisy.round().clamp(0, 255).to(torch.uint8)


class SourceAdversary(torch.nn.Module):
    """Names a training face's source among the sources of its own class, from the pooled
    features, through a gradient reversal (DANN, Ganin & Lempitsky 2015): the head learns to
    name the source, the features are pushed to make that impossible. Within a class only, so
    that what is reversed is the source's look (camera, codec, framing, who is in it), not the
    real/fake signal itself. Used in training only; no checkpoint's model carries it."""

    def __init__(self, width, source_class):
        super().__init__()
        self.head = torch.nn.Linear(width, len(source_class))
        self.register_buffer("source_class", torch.as_tensor(source_class))

    def forward(self, pooled, labels, strength):
        logits = self.head(ReverseGradient.apply(pooled, strength))
        return logits.masked_fill(self.source_class[None, :] != labels[:, None], float("-inf"))


class ReverseGradient(torch.autograd.Function):
    """Identity forward, gradient times -strength backward. Hand-written: PyTorch has no
    gradient reversal layer, and it is four lines."""

    @staticmethod
    def forward(ctx, x, strength):
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.strength * grad, None


def _plain(module):
    return module.module if isinstance(module, DDP) else module


class AugmentedImages(Dataset):
    def __init__(self, images, labels, transform, sources):
        self.images, self.labels, self.transform = images, labels, transform
        self.sources = sources  # each image's source id (the source adversary's target)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index_and_seed):
        """(index, seed) from SeededShard: the augmentation draws from its own seed, so which
        crop a sample gets depends on neither the worker that makes it nor the process's RNG
        state, and a resumed run augments exactly as an uninterrupted one would."""
        i, seed = index_and_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(self.images[i]), self.labels[i], self.sources[i]


def load_resume(args):
    """--resume: the run's checkpoint, with the run's own settings put back into args (a
    resumed run ends exactly where an uninterrupted one would); where it runs (device,
    threads, loader workers: none of them changes the numbers) is this call's. A setting typed
    with --resume that differs from the run's is said to be ignored. None for a fresh run."""
    if not args.resume:
        return None
    try:
        _, resume = load_checkpoint(args.resume)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    if "optimizer" not in resume:
        sys.exit(f"error: {args.resume} holds no optimizer state; resume from a last.pt")
    defaults = vars(parse_args([]))
    for key, value in saved_train_args(resume).items():
        if key in ("device", "threads", "workers", "resume") or key not in defaults:
            continue  # where it runs is this call's; a flag since removed (--refinish) is left out
        typed = getattr(args, key, None)
        # Said once under torchrun (rank 0), not by every process.
        if typed != defaults.get(key) and typed != value and os.environ.get("RANK", "0") == "0":
            print(f"warning: --{key.replace('_', '-')} {typed} ignored: a resumed run keeps "
                  f"its own settings ({value})", file=sys.stderr)  # fmt: skip
        setattr(args, key, value)
    return resume


# The recipe options added for data v3, each at its "off" value (its default). Runs from before
# an option existed trained with it off; experiments/lofo.py checks every run against them.
RECIPE_OPTIONS_OFF = {
    "native_p": 0.0, "no_highpass": False, "rotate": 0.0, "colour": 0.0, "mask_p": 0.0,
    "residual_blocks": 0, "noise_p": 0.0, "double_jpeg_p": 0.0, "kernel_p": 0.0,
    "source_adversary": 0.0,
}  # fmt: skip


def saved_train_args(ckpt):
    """A checkpoint's train.py arguments with what older runs left implicit made explicit:
    runs from before --jpeg-p re-compressed with the blur probability, --degrade-p, those
    from before --attention-stage put the layer after stage 2, and those from before the
    data-v3 options (--native-p, --rotate, ...) had them off."""
    args = dict(ckpt["train_args"])
    args.setdefault("jpeg_p", args["degrade_p"])
    args.setdefault("rescale_p", 0.0)  # runs from before --rescale-p did not rescale
    args.setdefault("attention_stage", 2)  # the one place before --attention-stage
    # Runs from before the data-v3 recipe options trained without them.
    for key, off in RECIPE_OPTIONS_OFF.items():
        args.setdefault(key, off)
    return args


def setup_distributed(device_name):
    """One process per GPU (or CPU worker) under torchrun, which sets WORLD_SIZE, RANK and
    LOCAL_RANK; a plain `python train.py` is a world of one. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def stop_like_ctrl_c(signum, frame):
    """SIGTERM (a job scheduler, `kill`) ends the run the way Ctrl-C does."""
    raise KeyboardInterrupt


def git_commit():
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def write_history(path, history):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, lineterminator="\n")
            w.writeheader()
            for h in history:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})

    atomic_write(path, write)


def plot_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.plot(epochs, [h["train_acc"] for h in history], "o-", label="train (augmented)")
    ax2.plot(epochs, [h["val_acc"] for h in history], "o-", label="validation")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), suffix=".png")
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C while loading: stop quietly, nothing half-written
        sys.exit("\ninterrupted")
