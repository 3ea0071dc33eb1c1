"""Exploration before protocol II, on VALIDATION images (Fashion-MNIST train split, none in a
protocol training folder). Run from the project root after `default_protocol.py run` made its
folders: python benchmarks/results/default-protocol-ii/explore.py CLASS SEED STEPS [key=value ...]
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import default_protocol as dp  # noqa: E402
from sklearn.covariance import LedoitWolf  # noqa: E402

from firmad import calibration as cal  # noqa: E402
from firmad.data.sources import load_dataset
from firmad.detector import OneClassDetector
from firmad.factory import build_extractor  # noqa: E402
from firmad.fitting import detector_for_fit, fit_images
from firmad.inputs import (
    find_images,
    load_files,  # noqa: E402
)

torch.set_num_threads(1)
c, seed, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
extra = sys.argv[4:]  # overrides
tag = f"c{c}-s{seed}-b{steps}" + (
    "-"
    + "-".join(
        e.replace("=", "").replace(".", "").replace("[", "").replace("]", "").replace(",", "")
        for e in extra
    )
    if extra
    else ""
)
out = Path("runs/explore")
train = load_dataset("fashion-mnist", "train")
img, lab = train.images[:, 0].numpy(), train.labels.numpy()
folder = Path(f"runs/protocol/data/train-c{c}-s{seed}")
if not folder.exists():
    folder = dp.make_train_folder(Path("runs/protocol"), img, lab, c, seed)
# validation folder: train split, excluding every protocol training pick of this class (seeds 0-2)
val = out / f"val-c{c}"
if not (val / "done").exists():
    val.mkdir(parents=True, exist_ok=True)
    used = set()
    for s in range(3):
        ids = np.flatnonzero(lab == c)
        used |= set(np.random.default_rng(s).choice(ids, 1000, replace=False).tolist())
    rng = np.random.default_rng(999 + c)
    for k in range(10):
        pool = [i for i in np.flatnonzero(lab == k) if i not in used]
        n = 300 if k == c else 100
        for i, j in enumerate(rng.choice(pool, n, replace=False)):
            dp._write(img[j], val / f"{k}_{i:04d}", i)
    (val / "done").write_text("")
det_dir = out / f"det-{tag}"
if (det_dir / "done").exists():
    det = OneClassDetector.load(det_dir)
    images = fit_images(folder, det, say=lambda m: None, warn=lambda m: None)
else:
    opts = dp.as_shipped_then(seed, tuple(extra), steps=steps)
    det = detector_for_fit(opts)
    images = fit_images(folder, det, say=lambda m: None, warn=lambda m: None)
    t = time.perf_counter()
    det.fit(images)
    print("fit", time.perf_counter() - t, flush=True)
    det.save(det_dir)
    np.save(det_dir / "held.npy", np.asarray(det.heldout_indices_))
    (det_dir / "done").write_text("")
files = find_images([val])[0]
true = np.array([int(f.name.split("_")[0]) for f in files])
held = torch.as_tensor(np.load(det_dir / "held.npy"))
kept = torch.ones(len(images), dtype=torch.bool)
kept[held] = False
rows = {}


def add(name, test, heldsc):
    th = cal.conformal_threshold(heldsc, 0.05)
    rows[name] = dp.measure(test, th, true, c)
    rows[name]["_test"], rows[name]["_held"] = test, heldsc


for scorer in ["mahalanobis", "knn_cos:k=5"]:
    for variant in ["plain", "angled"]:
        d = (
            OneClassDetector.from_model(det.model_, det.config_, scorer=scorer, k=None)
            if variant == "plain"
            else None
        )
        if d is None:
            d = OneClassDetector.from_model(det.model_, det.config_, scorer=scorer, k=None)
            d.variant = "angled"
        d.fit_bank(images[kept]).calibrate(images[held], target_fpr=0.05)
        add(f"{scorer}/{variant}", d.decision_function(files), d.heldout_scores_)


test_u8 = load_files(files, det.size, det.make_config().data.channels)
tr_u8, he_u8 = images[kept], images[held]


def pix(u8):  # grey pixels in [0, 1]
    return u8[:, 0].reshape(len(u8), -1).double().numpy() / 255.0


def knn_l2(bank, x, k=5):
    d = torch.cdist(torch.as_tensor(x), torch.as_tensor(bank))
    return d.topk(k, largest=False).values.mean(1).numpy()


def maha(bank, x):
    lw = LedoitWolf().fit(bank)
    return lw.mahalanobis(x)


P = {n: pix(u) for n, u in (("tr", tr_u8), ("he", he_u8), ("te", test_u8))}
add("pixel-knn-l2:k=5", knn_l2(P["tr"], P["te"]), knn_l2(P["tr"], P["he"]))
add("pixel-maha-lw", maha(P["tr"], P["te"]), maha(P["tr"], P["he"]))
# multi-level: global-average-pooled output of every stage of the encoder's ResNet

enc = build_extractor(det.config_, det.model_.encoder)
net = enc.encoder.net
feats = {}
hooks = [
    m.register_forward_hook(
        lambda mod, i, o, n=n: feats.__setitem__(n, o.float().mean((2, 3)).double())
    )
    for n, m in [("stem", net.stem)] + [(f"l{i}", l) for i, l in enumerate(net.layers)]
]


def levels(u8):
    outs = {}
    with torch.no_grad():
        for ch in u8.split(256):
            feats.clear()
            enc.eval()
            enc(ch.float() / 255.0)
            for n, v in feats.items():
                outs.setdefault(n, []).append(v)
    return {n: torch.cat(v).numpy() for n, v in outs.items()}


L = {n: levels(u) for n, u in (("tr", tr_u8), ("he", he_u8), ("te", test_u8))}
for h in hooks:
    h.remove()
zs_te, zs_he = [], []
for n in L["tr"]:
    te, he = maha(L["tr"][n], L["te"][n]), maha(L["tr"][n], L["he"][n])
    add(f"level-maha:{n}", te, he)
    zs_te.append((te - he.mean()) / he.std())
    zs_he.append((he - he.mean()) / he.std())
add("levels-maha-zsum", np.sum(zs_te, 0), np.sum(zs_he, 0))


def z(name):
    r = rows[name]
    m, s = r["_held"].mean(), r["_held"].std()
    return (r["_test"] - m) / s, (r["_held"] - m) / s


def ens(names, label):
    parts = [z(n) for n in names]
    add(label, np.mean([p[0] for p in parts], 0), np.mean([p[1] for p in parts], 0))


ens(["mahalanobis/plain", "pixel-knn-l2:k=5"], "z(maha, pixel-knn)")
ens(["mahalanobis/angled", "pixel-knn-l2:k=5"], "z(maha-angled, pixel-knn)")
ens(["mahalanobis/plain", "levels-maha-zsum"], "z(maha, levels)")
ens(["mahalanobis/angled", "levels-maha-zsum"], "z(maha-angled, levels)")
names = load_dataset("fashion-mnist", "test").classes
res = {}
for n, r in rows.items():
    pc = " ".join(f"{names[int(k)][:5]}{100 * v:.0f}" for k, v in r["recall_per_class"].items())
    print(
        f"{n:28s} AUROC {100 * r['auroc']:.1f} recall {100 * r['recall']:.0f} "
        f"fpr {100 * r['fpr']:.1f} | {pc}"
    )
    res[n] = {k: v for k, v in r.items() if not k.startswith("_")}
(out / f"res-{tag}.json").write_text(json.dumps(res, indent=1))
