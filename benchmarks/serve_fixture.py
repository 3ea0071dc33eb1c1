"""The files `benchmarks/serve_browser.py` drives the page with, made with firmad's own Python:

    python benchmarks/serve_fixture.py WORK_DIR

writes into WORK_DIR: ``normal/`` (80 Fashion-MNIST T-shirts from the test fixture), ``det/``
(a tiny detector fitted on them with `firmad fit`, seconds on a CPU), ``images/`` (24 test
images of mixed classes as PNG and JPEG of odd sizes, one file that is no image, and files
named like HTML, a Markdown image and a Markdown link), ``expected.csv`` + ``expected-report/``
(`firmad score` of ``images/``: what the page must show) and ``hostile/`` (a report folder
holding a file named ``javascript:alert(document.domain).png`` and Markdown that links an
external image). Prints a JSON object with these paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from firmad.cli import main as firmad
from firmad.data import one_vs_rest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "fashion-mnist"
# A detector small enough to fit in seconds (the test suite's tiny recipe).
TINY = [
    "data.size=16", "model.backbone=resnet_small", "model.width=0.25", "model.head_depth=2",
    "model.head_hidden=64", "model.head_out=32", "augment.blur_p=0.0", "train.epochs=1",
    "train.batch_size=16", "train.steps_per_epoch=4", "train.device=cpu",
]  # fmt: skip
HOSTILE_NAMES = (
    "<img src=x onerror=alert(document.domain)>.png",
    "![a](https:evil.example?beacon).png",
    "[Download](https:evil.example).png",
)


def make(work: Path) -> dict:
    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE), max_test=200)
    normal, images, hostile = work / "normal", work / "images", work / "hostile"
    for folder in (normal, images, hostile):
        folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(split.train_images[:80]):
        Image.fromarray(img[0].numpy()).save(normal / f"{i}.png")
    labels = split.test_labels.tolist()
    chosen = [i for i, y in enumerate(labels) if y == 0][:12]
    chosen += [i for i, y in enumerate(labels) if y == 1][:12]
    for n, i in enumerate(chosen):
        picture = Image.fromarray(split.test_images[i][0].numpy()).resize((28 + n % 5, 28 + n % 3))
        kind = "anomaly" if labels[i] else "normal"
        picture.save(images / f"{kind} {n:02d}.{'jpg' if n % 3 == 0 else 'png'}")
    for i, name in enumerate(HOSTILE_NAMES):
        Image.fromarray(split.test_images[30 + i][0].numpy()).save(images / name)
    (images / "notes.png").write_text("not an image")  # the page must show its error
    (hostile / "javascript:alert(document.domain).png").write_bytes(
        (images / "normal 01.png").read_bytes()
    )
    (hostile / "beacon.md").write_text(
        "# Beacon\n\n![a](https:evil.example?beacon) ![b](http://evil.example/b.png)\n\n"
        "[Download](https:evil.example) [local](beacon.md)\n"
    )
    det = work / "det"
    if not (det / "detector.json").exists():
        args = ["-q", "fit", str(normal), "--out", str(det)]
        assert firmad(args + [a for item in TINY for a in ("--set", item)]) == 0
    csv = work / "expected.csv"
    assert firmad(["-q", "score", str(det), str(images), "--out", str(csv)]) == 0
    return {"detector": str(det), "images": str(images), "expected": str(csv),
            "reports": [str(hostile), str(work / "expected-report")]}  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(make(Path(sys.argv[1]))))
