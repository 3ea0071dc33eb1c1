"""Shared test helpers: the committed Fashion-MNIST fixture and a tiny, fast recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURE_FMNIST = Path(__file__).parent / "fixtures" / "fashion-mnist"

# A recipe small enough for a 2-core CPU in seconds: the fixture, a narrow ResNet-10, 16 px.
TINY = [
    f"data.root={FIXTURE_FMNIST}",
    "data.size=16",
    "data.max_test=200",
    "model.backbone=resnet_small",
    "model.width=0.25",
    "model.head_depth=2",
    "model.head_hidden=64",
    "model.head_out=32",
    "augment.blur_p=0.0",
    "train.epochs=2",
    "train.batch_size=16",
    "train.steps_per_epoch=4",
    "train.device=cpu",
    "eval.scorers=[knn_cos:k=5, centre]",
    "eval.batch_size=256",
]


# Deep SVDD on top of TINY: the bias-free LeNet (32 px), normals only, no augmentation.
DSVDD_TINY = [
    "method.name=dsvdd",
    "model.backbone=lenet",
    "model.width=1.0",
    "data.size=32",
    "outliers.kinds=[]",
    "augment.enabled=false",
]


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """No test sees the developer's $FIRMAD_DATA, cache, ./data or the reader cache."""
    from firmad.data import sources

    monkeypatch.delenv("FIRMAD_DATA", raising=False)
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    sources._read_builtin.cache_clear()


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sigint_at_call(step, n: int):
    """Wrap a training step (bound method or ``Trainer.train_step`` itself) so that its n-th
    call sends this process a real SIGINT before running."""
    import os
    import signal

    calls = {"n": 0}

    def wrapped(*args):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args)

    return wrapped


# A read-only folder holds only for a process that cannot bypass file modes: as root it keeps
# uid 0 (Python may live under /root) but drops the capabilities that ignore them.
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2

_READ_ONLY_PRELUDE = """
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
try:
    (folder / "probe").write_text("x")
except PermissionError:
    pass
else:
    print(json.dumps({"skip": "this user can write into a folder of mode 0555"}))
    sys.exit(0)
"""


def _drop_permission_override() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # fails harmlessly when not privileged


def run_in_read_only_folder(folder: Path, body: str, *args: str, timeout: int = 120):
    """Make ``folder`` mode 0555 and run ``body`` (Python, with ``folder`` defined and the
    extra ``args`` in sys.argv[2:]) in a subprocess that cannot bypass file modes; restore the
    mode. Skips the test where the folder stays writable. Returns (process, the JSON object
    the body printed last)."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    import firmad

    src = Path(firmad.__file__).resolve().parents[1]  # the firmad the tests imported
    folder.chmod(0o555)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_PRELUDE + textwrap.dedent(body), str(folder), *args],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(src)},
            preexec_fn=_drop_permission_override,
            timeout=timeout,
        )
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return proc, result


def folder_detector(tmp: Path, overrides: list[str]):
    """A detector fitted on a folder of fixture PNGs (as `firmad fit` reads them) and
    calibrated on a second folder: 64 training and 20 held-out T-shirts under ``tmp``;
    returns (detector, the fixture's one-vs-rest split)."""
    from PIL import Image

    from firmad.data import one_vs_rest
    from firmad.detector import OneClassDetector

    split = one_vs_rest("fashion-mnist", 0, root=str(FIXTURE_FMNIST), max_test=40)
    for i, img in enumerate(split.train_images[:84]):
        folder = tmp / ("train" if i < 64 else "held")
        folder.mkdir(exist_ok=True)
        Image.fromarray(img[0].numpy()).save(folder / f"{i}.png")
    det = OneClassDetector(overrides=overrides).fit(tmp / "train")
    return det.calibrate(tmp / "held", target_fpr=0.1), split
