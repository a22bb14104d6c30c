"""The frequency-spectrum baseline on the yardstick of unseen sources: does a linear model of
the face's power spectrum tell unseen generators from unseen cameras better than the CNN?

    python experiments/spectrum.py                       # both feature sets, both folds
    python experiments/two_fold.py --table               # its rows beside the CNN candidates

The data README's first measurements found "a plain spectrum + logistic regression" the recipe
that generalised best to an unseen generator family (Durall et al. 2020, "Watch your
up-convolution": GAN upsampling leaves a high-frequency signature). Here, on the model's own
view of each face (common.load_rows: the 128 px canonical framing every stage uses):

  radial   the azimuthal mean of the grey image's log power spectrum, 64 rings, minus its own
           mean (so brightness and contrast do not count): 64 numbers a face;
  grid     the log power spectrum itself mean-pooled to 16 x 16, minus its mean: 256 numbers
           (each point twice: the spectrum of a real image is point-symmetric), which can see
           direction too (a grid artefact of upsampling lies on the axes).

A standardised logistic regression (sklearn; C picked on the half's validation split by ROC-AUC)
trains on one half's train split (experiments/two_fold.FOLDS), its threshold set on that half's
validation split by the rule every checkpoint uses (calibrate.choose_threshold), then every
image of the other half is scored, unseen; then the halves swap. Results are written in the
yardstick's schema (results/yardstick/spectrum-<features>.json), so two_fold.py --table lists
them beside the CNN candidates. Features are cached in runs/spectrum/ (about 2 minutes once).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from torchvision.transforms.v2.functional import rgb_to_grayscale  # noqa: E402
from two_fold import FOLDS, OTHER, _sources, fold_record, save  # noqa: E402

from calibrate import choose_threshold, unsure_band  # noqa: E402
from common import load_rows, read_manifest  # noqa: E402

FEATURES = ("radial", "grid")
RINGS = 64
GRID = 16
C_VALUES = (0.001, 0.01, 0.1, 1.0, 10.0)


def log_power(images):
    """uint8 N x 3 x S x S -> the grey images' centred log power spectra, float32 N x S x S."""
    grey = rgb_to_grayscale(images.float() / 255)[:, 0].numpy()
    spectrum = np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))
    power = np.log(np.abs(spectrum) ** 2 + 1e-8).astype(np.float32)
    # The DC term is the mean brightness: replaced by its four neighbours' mean, so that it
    # moves with contrast like every other frequency and the per-image mean taken later
    # removes contrast from every feature (a constant there would carry contrast instead).
    c = grey.shape[-1] // 2
    power[:, c, c] = (power[:, c - 1, c] + power[:, c + 1, c] + power[:, c, c - 1]
                      + power[:, c, c + 1]) / 4  # fmt: skip
    return power


def radial_profile(power, rings=RINGS):
    """Azimuthal mean of N x S x S centred spectra over `rings` rings out to the Nyquist circle
    (the corners beyond it are left out: only the diagonal reaches them); at most one ring a
    pixel of radius, or the innermost rings hold no frequency."""
    size = power.shape[-1]
    rings = min(rings, size // 2)
    y, x = np.indices((size, size)) - size // 2
    radius = np.hypot(x, y) / (size / 2)
    ring = np.minimum((radius * rings).astype(int), rings)  # rings: outside the circle
    counts = np.bincount(ring.ravel(), minlength=rings + 1)[:rings]
    flat = power.reshape(len(power), -1)
    sums = np.stack(
        [np.bincount(ring.ravel(), weights=p, minlength=rings + 1)[:rings] for p in flat]
    )
    profile = sums / counts
    return profile - profile.mean(axis=1, keepdims=True)


def pooled_grid(power, grid=GRID):
    """N x S x S centred spectra mean-pooled to grid x grid, minus each image's mean."""
    step = power.shape[-1] // grid
    pooled = power[:, : grid * step, : grid * step].reshape(len(power), grid, step, grid, step)
    pooled = pooled.mean(axis=(2, 4)).reshape(len(power), -1)
    return pooled - pooled.mean(axis=1, keepdims=True)


FEATURE_VERSION = 3  # 1: the DC term was a constant (it carried contrast); 2: hand-written grey


def features_of(rows, cache, batch=1024):
    """Both feature sets for every row, cached: reused only for the same images (the
    manifest's files, absolute) measured the same way (FEATURE_VERSION, RINGS, GRID)."""
    key = np.array([r["file"] for r in rows] + [f"v{FEATURE_VERSION} {RINGS} {GRID}"])
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        if "key" in saved and np.array_equal(saved["key"], key):
            return {name: saved[name] for name in FEATURES}
    out = {name: [] for name in FEATURES}
    for start in range(0, len(rows), batch):
        power = log_power(load_rows(rows[start : start + batch]))
        out["radial"].append(radial_profile(power))
        out["grid"].append(pooled_grid(power))
        print(f"features: {min(start + batch, len(rows))}/{len(rows)}", flush=True)
    out = {name: np.concatenate(v).astype(np.float32) for name, v in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".tmp.npz")
    np.savez(tmp, key=key, **out)
    tmp.replace(cache)
    return out


def fit(x_train, y_train, x_val, y_val):
    """The logistic regression whose C scores the best validation ROC-AUC."""
    best = None
    for c in C_VALUES:
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000,
                                                                 class_weight="balanced"))  # fmt: skip
        clf.fit(x_train, y_train)
        auc = roc_auc_score(y_val, clf.predict_proba(x_val)[:, 1])
        if best is None or auc > best[0]:
            best = (auc, c, clf)
    return best


def score_fold(x, rows, trained_on):
    """Train on one half, score the other: the yardstick's figures (two_fold.fold_record)."""
    source = np.array([r["source"] for r in rows])
    split = np.array([r["split"] for r in rows])
    is_fake = np.array([r["label"] == "fake" for r in rows])
    seen = np.isin(source, _sources(trained_on))
    train, val, test = (seen & (split == s) for s in ("train", "val", "test"))
    start = time.time()
    val_auc, c, clf = fit(x[train], is_fake[train], x[val], is_fake[val])
    prob_val = clf.predict_proba(x[val])[:, 1]
    t = choose_threshold(prob_val, is_fake[val].astype(int), source[val])
    low, high, _ = unsure_band(prob_val, is_fake[val].astype(int), t)
    # The masks keep the rows' order: the same two lists two_fold.fold_rows makes.
    unseen = np.isin(source, _sources(OTHER[trained_on]))
    prob_seen, prob = (clf.predict_proba(x[mask])[:, 1] for mask in (test, unseen))
    record = fold_record(rows, trained_on, prob_seen, prob, t, (low, high))
    return {
        "trained_on": trained_on, "threshold": t, "best_epoch": None, "C": c,
        "val_auc": float(val_auc), **record, "train_minutes": (time.time() - start) / 60,
        "params": int(x.shape[1] + 1), "ort_ms_batch1": None,
    }  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="data/faces", help="prepared dataset (default data/faces)")
    p.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES),
                   help="feature sets to measure (default both)")  # fmt: skip
    p.add_argument("--cache", default="runs/spectrum/features.npz", help="feature cache")
    p.add_argument("--results", default="results/yardstick", help="default results/yardstick")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rows = read_manifest(args.data)
    features = features_of(rows, Path(args.cache))
    for name in args.features:
        result = {"name": f"spectrum-{name}", "epochs": "-", "folds": {},
                  "train_args": [f"(not train.py: experiments/spectrum.py, {name} log spectrum "
                                 "+ logistic regression)"]}  # fmt: skip
        for fold in FOLDS:
            result["folds"][fold] = score_fold(features[name], rows, fold)
            print(json.dumps({k: v for k, v in result["folds"][fold].items()
                              if not isinstance(v, dict)}), flush=True)  # fmt: skip
        out = Path(args.results) / f"{result['name']}.json"
        if out.is_file():
            out.unlink()  # a fresh measurement, not merged with an older one
        save(out, result)


if __name__ == "__main__":
    main()
