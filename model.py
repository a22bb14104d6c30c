"""FaceCheckNet: a compact CNN for real-vs-generated faces, with ONE spatial self-attention
layer that can be switched off (attention=False removes it; nothing else changes).

Layout at the default 128 px input (channels x positions):
    fixed high-pass residual (RGB + RGB - blur(RGB))          6 x 128²
    stem     3x3 stride-2 conv                                w0 x 64²
    stage 1  3x3 stride-2 conv, 3x3 conv                      w1 x 32²
    [or attention over the 1024 positions of stage 1]         w1 x 32²   (attention_stage 1)
    stage 2  3x3 stride-2 conv, 3x3 conv                      w2 x 16²
    [attention over the 256 positions of stage 2]             w2 x 16²   (attention_stage 2)
    stage 3  3x3 stride-2 conv, 3x3 conv                      w3 x 8²
    global average pool, dropout, linear -> 2 logits (real, fake)

Stride 2 from the first layer keeps the cost per image low on a CPU; the high-pass
residual hands the network the pixel-level noise where generator traces live, which
face content would otherwise drown. Everything is conv / batch norm / SiLU / matmul /
softmax / reshape, so it exports to ONNX and TensorRT as is.

    python model.py      # parameters and FLOPs of both variants
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import CLASS_NAMES, amp_dtype, atomic_write, to_model_input

DEFAULT_CONFIG = {
    "image_size": 128,
    "widths": (32, 64, 128, 256),
    "stem_stride": 2,
    "attention": True,
    # After which stage the layer sits: 2 (16² positions at 128 px, the default) or 1 (32²:
    # finer detail, 4x the positions and 16x the attention matrix).
    "attention_stage": 2,
    "attention_key_channels": 16,
    "dropout": 0.3,
    # Residual blocks (two 3x3 convs and a skip) after each stage's downsampling conv; 0 is the
    # original plain stage (downsampling conv, one 3x3 conv), which older checkpoints hold.
    "residual_blocks": 0,
    "highpass": True,
    # ImageNet statistics; the model takes [0, 1] RGB and normalises inside itself.
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def conv_bn_act(cin, cout, stride=1, kernel=3):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.SiLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity skip (He et al. 2016's basic block)."""

    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_act(channels, channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


def stage(cin, cout, residual_blocks):
    """A stride-2 conv, then one plain conv (residual_blocks 0) or that many residual blocks."""
    if residual_blocks == 0:
        return nn.Sequential(conv_bn_act(cin, cout, 2), conv_bn_act(cout, cout))
    return nn.Sequential(
        conv_bn_act(cin, cout, 2), *[ResidualBlock(cout) for _ in range(residual_blocks)]
    )


class SpatialSelfAttention(nn.Module):
    """Self-attention over the H*W positions of a feature map (SAGAN, Zhang et al. 2019):
    1x1-conv queries/keys/values, softmax(QK^T / sqrt(d)) V, a 1x1 output projection and a
    residual whose scale gamma starts at 0, so training begins from the plain CNN.
    A learned positional embedding is added to queries and keys (not values) so that
    attention can depend on where in the face a position is."""

    def __init__(self, channels, key_channels, height, width):
        super().__init__()
        self.scale = 1.0 / math.sqrt(key_channels)
        self.query = nn.Conv2d(channels, key_channels, 1)
        self.key = nn.Conv2d(channels, key_channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.position = nn.Parameter(torch.zeros(1, channels, height, width))
        self.gamma = nn.Parameter(torch.zeros(1))
        self.keep_map = False  # set True to keep the last attention map (heatmaps)
        self.last_map = None

    def forward(self, x):
        n, c, h, w = x.shape
        xp = x + self.position
        q = self.query(xp).flatten(2).transpose(1, 2)  # n, hw, d
        k = self.key(xp).flatten(2).transpose(1, 2)  # n, hw, d
        v = self.value(x).flatten(2).transpose(1, 2)  # n, hw, c
        if self.keep_map:  # the map itself is wanted: the plain formula, which materialises it
            attn = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * self.scale, dim=-1)
            self.last_map = attn.detach()  # n, hw(query), hw(key)
            out = torch.matmul(attn, v)
        else:  # the same product, fused: ~30 % less time in the layer at stage 1 (CPU, batch 64)
            # (one head; the ONNX exporter takes only (n, heads, positions, d) tensors)
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale).squeeze(1)
        out = out.transpose(1, 2).reshape(n, c, h, w)
        return x + self.gamma * self.proj(out)


class FaceCheckNet(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        self.config = cfg
        w0, w1, w2, w3 = cfg["widths"]
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))
        self.highpass = cfg["highpass"]
        cin = 6 if self.highpass else 3
        # Stride 4 (5x5 kernel) lets a 256 px input cost what a 128 px one does with stride 2.
        stem_stride = cfg["stem_stride"]
        self.stem = conv_bn_act(cin, w0, stride=stem_stride, kernel=3 if stem_stride == 2 else 5)
        blocks = cfg["residual_blocks"]
        self.stage1 = stage(w0, w1, blocks)
        self.stage2 = stage(w1, w2, blocks)
        self.attention_stage = cfg["attention_stage"]
        if self.attention_stage not in (1, 2):
            raise ValueError(f"attention_stage must be 1 or 2, not {self.attention_stage!r}")
        channels = w1 if self.attention_stage == 1 else w2
        side = cfg["image_size"] // (stem_stride * 2 * self.attention_stage)
        self.attention = (
            SpatialSelfAttention(channels, cfg["attention_key_channels"], side, side)
            if cfg["attention"]
            else None
        )
        self.stage3 = stage(w2, w3, blocks)
        self.dropout = nn.Dropout(cfg["dropout"])
        self.head = nn.Linear(w3, 2)

    def features(self, x):
        """[0, 1] RGB N x 3 x H x W -> stage-3 feature map (Grad-CAM hooks here)."""
        x = (x - self.mean) / self.std
        if self.highpass:
            # Fixed 3x3 box blur per channel; x - blur(x) keeps the fine noise residual.
            blur = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
            x = torch.cat([x, (x - blur) * 4.0], dim=1)
        x = self.stage1(self.stem(x))
        if self.attention is not None and self.attention_stage == 1:
            x = self.attention(x)
        x = self.stage2(x)
        if self.attention is not None and self.attention_stage == 2:
            x = self.attention(x)
        return self.stage3(x)

    def forward(self, x, with_pooled=False):
        """Returns logits N x 2 (index 0 = real, 1 = fake); with_pooled, also the pooled
        features N x C the head reads (train.py's source adversary reads them too)."""
        pooled = self.features(x).mean(dim=(2, 3))
        logits = self.head(self.dropout(pooled))
        return (logits, pooled) if with_pooled else logits


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_flops(model, image_size=None):
    """FLOPs (multiply and add counted separately) of one forward pass on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    size = image_size or model.config["image_size"]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    model.train(was_training)
    return counter.get_total_flops()


@torch.no_grad()
def predict(model, images, device, batch_size=256, precision="auto"):
    """Fake-class probabilities and logits of uint8 images N x 3 x H x W (mixed precision on
    CUDA as common.amp_dtype says; train.py passes its --precision)."""
    model.eval()
    dtype = amp_dtype(device, precision)
    logits = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start : start + batch_size]).to(device)
        if device.type == "cuda":
            batch = batch.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits.append(model(batch).float().cpu())
    logits = torch.cat(logits)
    return logits.softmax(1)[:, 1], logits


def deployment_metadata(ckpt):
    """What a deployed model says about itself, made from its checkpoint: the one definition.
    export.py writes it into the ONNX file's metadata_props (and an engine's .json), where
    backends.parse_metadata reads it back; backends.load_torch takes it straight from here.
    Input size, face framing, decision threshold and band, class names, the validation record
    and provenance; precision is the file's own (export.set_metadata overrides it). A checkpoint
    from before a field existed gets the value that was implied then."""
    threshold = ckpt["threshold"]
    return {
        "format": "facecheck",
        "image_size": ckpt["image_size"],
        "faces": ckpt.get("faces", "whole"),
        "class_names": list(ckpt.get("class_names", CLASS_NAMES)),
        "threshold": threshold,
        "unsure_band": list(ckpt.get("unsure_band") or [threshold] * 2),
        "confident_calls": ckpt.get("val_metrics", {}).get("confident_calls"),
        "attention": bool(ckpt["config"]["attention"]),
        "manifest_sha256": ckpt.get("manifest_sha256", ""),
        "epoch": ckpt.get("epoch", ""),
        "git_commit": ckpt.get("git_commit", ""),
        "val_metrics": ckpt.get("val_metrics", {}),
        "precision": "fp32",
    }


class CheckpointError(Exception):
    """A file that is not a usable facecheck checkpoint; str(exc) is a one-line reason."""


CHECKPOINT_VERSION = 1  # train.py's "version"; a file without one is from before it: 1


def checkpoint_problem(ckpt, model):
    """Why the checkpoint's own fields (beside the weights) cannot be used, or None: every
    script reads the input size and the threshold from here, so a bad value must stop here,
    not as a traceback in export.py or an ONNX file with the wrong input size."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    size = ckpt.get("image_size")
    if not isinstance(size, int) or size != model.config["image_size"]:
        return f"image_size {size!r} is not the model config's {model.config['image_size']}"
    threshold = ckpt.get("threshold")
    if not number(threshold) or not 0 <= threshold <= 1:
        return f"threshold {threshold!r} is not a probability"
    band = ckpt.get("unsure_band")
    if band is not None and not (len(band) == 2 and all(map(number, band)) and band[0] <= band[1]):
        return f"unsure_band {band!r} is not two numbers, low <= high"
    return None


def load_checkpoint(path, map_location="cpu"):
    """Load a facecheck checkpoint safely (weights_only: a pickle payload is refused, never
    run) and rebuild the model from the config stored inside it. Returns (model, checkpoint)."""
    import pickle

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(
            f"{path}: refused, not a plain weights file ({first[:120]})"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "facecheck" or "model" not in ckpt:
        raise CheckpointError(
            f"{path}: not a facecheck checkpoint (no 'format': 'facecheck' entry)"
        )
    version = ckpt.get("version", CHECKPOINT_VERSION)
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}; this code reads {CHECKPOINT_VERSION}"
        )
    try:
        model = FaceCheckNet(ckpt["config"])
        model.load_state_dict(ckpt["model"])
    except Exception as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:200]
        raise CheckpointError(
            f"{path}: weights do not fit the stored model config ({detail})"
        ) from None
    if problem := checkpoint_problem(ckpt, model):
        raise CheckpointError(f"{path}: {problem}")
    model.eval()
    return model, ckpt


def save_checkpoint(path, state):
    """Write a checkpoint dict atomically: a run cut mid-write keeps its previous file whole."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


if __name__ == "__main__":
    for attention in (False, True):
        m = FaceCheckNet({"attention": attention})
        print(
            f"attention {'on ' if attention else 'off'}: {count_parameters(m):,} parameters, "
            f"{count_flops(m) / 1e6:.1f} MFLOPs per {m.config['image_size']} px image"
        )
