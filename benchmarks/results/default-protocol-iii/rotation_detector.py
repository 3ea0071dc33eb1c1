"""A rotation-scorer detector on the network of a `firmad fit` detector: the same network, bank
and held-out images (the held-out draw is `fit`'s, from its seed), scored with `--scorer rotation
--variant angled` and thresholded at the same target. Used to attack both scorers on one network.

    python benchmarks/results/default-protocol-iii/rotation_detector.py FIT_DIR OUT_DIR FOLDER
"""

import sys
from pathlib import Path

import numpy as np
import torch

from firmad.detector import OneClassDetector, heldout_split
from firmad.fitting import fit_images

fit_dir, out_dir, folder = (Path(a) for a in sys.argv[1:4])
det = OneClassDetector.load(fit_dir)
images = fit_images(folder, det, say=lambda m: None, warn=lambda m: None)
held, _ = heldout_split(len(images), det.holdout_size(len(images)), det.config_.train.seed)
held = torch.as_tensor(held)
kept = torch.ones(len(images), dtype=torch.bool)
kept[held] = False
# the same held-out images as fit's: their scores under fit's own scorer are its stored ones
same = np.allclose(np.sort(det.decision_function(images[held])), np.sort(det.heldout_scores_))
print("held-out images are fit's:", same)
rot = OneClassDetector.from_model(det.model_, det.config_, scorer="rotation", k=None,
                                  variant="angled")  # fmt: skip
rot.fit_bank(images[kept]).calibrate(images[held], target_fpr=det.target_fpr)
rot.save(out_dir)
print(f"threshold {rot.threshold_:.6g} (fit's detector: {det.threshold_:.6g})")
