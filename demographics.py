"""Who gets called fake: real faces called real per demographic group, where the data says who
is in the photo. Two sources carry labels in their file names (../shared/data/README.md):

- utkface: age_gender_race_date.jpg; gender 0 male, 1 female; race 0 White, 1 Black, 2 Asian,
  3 Indian, 4 Other;
- allagefaces: %05dA%02d.jpg = serial + age; serials below 07381 are women, the rest men.

A group is one value of one attribute (race, gender, age band), pooled over the sources that
label it. The headline is the gap between the best and the worst group in share called real,
over the groups with at least min_n faces (a handful of faces would make the gap by chance),
with how sure it is: each group's share with its Wilson 95 % interval, and the gap chance
alone makes with these groups and sources (a permutation test: max - min over a dozen groups of a few
dozen faces is several points even when no group is treated differently).
Used by evaluate.py and experiments/lofo.py.
"""

import re
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from calibrate import decision

RACES = ("White", "Black", "Asian", "Indian", "Other")
GENDERS = ("male", "female")
AGE_BANDS = ((0, "0-12"), (13, "13-19"), (20, "20-39"), (40, "40-59"), (60, "60+"))  # from age
ATTRIBUTES = ("race", "gender", "age")
MIN_GROUP = 20  # faces a group needs to count towards the gap
GAP_PERMUTATIONS = 2000  # shuffles for the gap's chance level
ALL_AGE_FACES_FIRST_MAN = 7381


def age_band(age):
    return [name for low, name in AGE_BANDS if age >= low][-1]


def demographic_labels(source, original):
    """{"race", "gender", "age"} as far as the original file's name tells ({} for a source
    without labels, or a name that does not parse)."""
    name = Path(original).name
    if source == "utkface" and (m := re.match(r"(\d+)_([01])_([0-4])_", name)):
        age, gender, race = map(int, m.groups())
        return {"race": RACES[race], "gender": GENDERS[gender], "age": age_band(age)}
    if source == "allagefaces" and (m := re.match(r"(\d{5})A(\d{2})", name)):
        serial, age = map(int, m.groups())
        gender = "female" if serial < ALL_AGE_FACES_FIRST_MAN else "male"
        return {"gender": gender, "age": age_band(age)}
    return {}


def called_real_by_group(rows, prob, threshold, band=None, min_n=MIN_GROUP):
    """The real faces of rows (manifest rows: source, label, original) that carry labels, per
    group: n, the sources it draws on, the share called real at the threshold and, with an
    unsure band, the share called fake confidently (calibrate.decision); and the gap between
    the best and the worst group of at least min_n faces. None when no real face is labelled."""
    prob = np.asarray(prob, dtype=float)
    labelled = [(i, demographic_labels(r["source"], r["original"])) for i, r in enumerate(rows)
                if r["label"] == "real"]  # fmt: skip
    labelled = [(i, labels) for i, labels in labelled if labels]
    if not labelled:
        return None
    labelled_index = np.array([i for i, _ in labelled])
    faces_real = prob[labelled_index] < threshold
    order = RACES + GENDERS + tuple(name for _, name in AGE_BANDS)
    groups, members = [], []  # members: which labelled faces each group holds
    for attribute in ATTRIBUTES:
        values = {labels[attribute] for _, labels in labelled if attribute in labels}
        for value in sorted(values, key=order.index):
            idx = [i for i, labels in labelled if labels.get(attribute) == value]
            p = prob[idx]
            sources = sorted({rows[i]["source"] for i in idx})
            members.append(np.isin(labelled_index, idx))
            real = int(faces_real[members[-1]].sum())
            interval = binomtest(real, len(idx)).proportion_ci(method="wilson")
            group = {"attribute": attribute, "group": value, "n": len(idx),
                     "sources": {s: sum(rows[i]["source"] == s for i in idx) for s in sources},
                     "called_real": real / len(idx),
                     "called_real_95": [float(interval.low), float(interval.high)]}  # fmt: skip
            if band is not None:
                calls = [decision(x, threshold, band) for x in p]
                group["called_fake_confidently"] = float(np.mean([c == "fake" for c in calls]))
            groups.append(group)
    counted = [g for g in groups if g["n"] >= min_n]
    gap = None
    if len(counted) >= 2:
        best = max(counted, key=lambda g: g["called_real"])
        worst = min(counted, key=lambda g: g["called_real"])
        measured = best["called_real"] - worst["called_real"]
        chance = gap_by_chance([m for g, m in zip(groups, members) if g["n"] >= min_n],
                               faces_real, measured, [rows[i]["source"] for i in labelled_index])  # fmt: skip
        gap = {"gap": measured,
               "best": f"{best['attribute']} {best['group']}", "best_called_real": best["called_real"],
               "worst": f"{worst['attribute']} {worst['group']}",
               "worst_called_real": worst["called_real"], "by_chance": chance,
               "over": [f"{g['attribute']} {g['group']}" for g in counted]}  # fmt: skip
    per_attribute = {}
    for attribute in ATTRIBUTES:
        shares = [g["called_real"] for g in counted if g["attribute"] == attribute]
        per_attribute[attribute] = max(shares) - min(shares) if len(shares) >= 2 else None
    return {"n_labelled": len(labelled), "min_n": min_n, "threshold": float(threshold),
            "unsure_band": None if band is None else [float(b) for b in band],
            "groups": groups, "gap": gap, "gap_per_attribute": per_attribute}  # fmt: skip


def gap_by_chance(members, called_real, gap, sources, permutations=GAP_PERMUTATIONS, seed=0):
    """How large a gap chance alone makes with these groups: the labelled faces' outcomes
    (called real or not) shuffled among the faces of the same source, so no group differs from
    another within a source, and the gap recomputed each time. Returns the median and the 95th
    percentile of those gaps and p, the share of shuffles with a gap at least the measured one
    (a permutation test). It keeps the groups' overlap (a face is in its race, gender and age
    group at once) and their mix of sources (race comes from UTKFace alone; age 60+ is mostly
    All-Age-Faces, age 0-12 mostly UTKFace): a difference between sources is not read as one
    between groups. members: groups x faces booleans; called_real: faces booleans; sources:
    each face's source. Hand-written: scipy.stats.permutation_test compares samples, not a
    max - min over groups that share their faces."""
    rng = np.random.default_rng(seed)
    members = np.asarray(members, dtype=float)
    called_real = np.asarray(called_real, dtype=float)
    sources = np.asarray(sources)
    shuffled = np.empty((permutations, len(called_real)))
    for source in np.unique(sources):
        idx = np.flatnonzero(sources == source)
        shuffled[:, idx] = rng.permuted(np.tile(called_real[idx], (permutations, 1)), axis=1)
    shares = (shuffled @ members.T) / members.sum(axis=1)
    gaps = shares.max(axis=1) - shares.min(axis=1)
    return {"p": float((np.sum(gaps >= gap - 1e-12) + 1) / (permutations + 1)),
            "median": float(np.median(gaps)), "p95": float(np.percentile(gaps, 95))}  # fmt: skip
