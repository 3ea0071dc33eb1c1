"""What decides numerics: the bf16 choice of ``train.amp: auto`` (and its record), fp32 where it
is forced or where scores are computed, channels-last features, and `firmad doctor`.

Every check compares two code paths in one process or a decision from given inputs; none
depends on the CPU it runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from firmad import hardware
from firmad.cli import main
from firmad.config import load_config
from firmad.factory import build_trainer
from firmad.hardware import Bf16Support, bf16_support, resolve_amp
from firmad.models import build_backbone
from firmad.scoring import ExtractOptions, FeatureExtractor, VariantScorer, extract_features
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cpu_bf16", "amx", "capability", "dnnl", "native"),
    [
        (True, False, "AVX512", None, True),  # AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake)
        (False, True, "AVX512", None, True),  # AMX (Intel Sapphire Rapids)
        (False, False, "AVX512", None, False),  # AVX-512 without bf16 (Skylake-X, Ice Lake)
        (True, False, "AVX2", None, False),  # ATEN_CPU_CAPABILITY=avx2 on a bf16 CPU
        (True, True, "DEFAULT", None, False),  # ATEN_CPU_CAPABILITY=default
        (True, False, "AVX512", "AVX2", False),  # DNNL_MAX_CPU_ISA=AVX2
        (True, False, "AVX512", "avx512_core", False),  # oneDNN held below bf16
        (True, False, "AVX512", "AVX512_CORE_BF16", True),
        (False, True, "AVX512", "avx512_core_amx", True),
    ],
)
def test_native_bf16_needs_instructions_and_kernels(cpu_bf16, amx, capability, dnnl, native):
    got = bf16_support(cpu_bf16, amx, capability, dnnl)
    assert got.native is native and got.reason


def test_amp_auto_follows_the_cpu_and_forced_values_are_kept():
    native = hardware.cpu_bf16().native
    assert resolve_amp("auto", "cpu")[0] == ("bf16" if native else "none")
    assert resolve_amp("none", "cpu") == ("none", "train.amp=none")
    assert resolve_amp("bf16", "cpu") == ("bf16", "train.amp=bf16")


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_a_lower_aten_capability_simulates_a_cpu_without_bf16(capability):
    code = (
        "from firmad.hardware import resolve_amp, cpu_capability; "
        "print(resolve_amp('auto', 'cpu')[0], cpu_capability())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    amp, used = proc.stdout.split()
    assert amp == "none" and used in ("AVX2", "DEFAULT")


@pytest.mark.parametrize("native", [True, False])
def test_the_auto_choice_is_recorded(monkeypatch, native):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: Bf16Support(native, "as told"))
    trainer = build_trainer(load_config("fmnist-cpu", [*TINY, "train.amp=auto"]))
    want = "bf16" if native else "none"
    assert trainer.settings.amp == want
    assert trainer.amp_dtype == (torch.bfloat16 if native else None)
    numerics = trainer.state()[1]["numerics"]  # what every checkpoint's metadata holds
    assert numerics["amp"] == want and numerics["amp_reason"] == "auto: as told"
    assert numerics["channels_last"] is True and numerics["cpu_capability"]


class _Dtypes(TorchDispatchMode):
    """The dtypes of every tensor going into or out of every op dispatched inside."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.seen.add(t.dtype)
        return out


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_forcing_fp32_leaves_no_bf16_in_the_step(amp, one_thread):
    trainer = build_trainer(load_config("fmnist-cpu", [*TINY, f"train.amp={amp}"]))
    trainer.model.train()
    with _Dtypes() as dtypes:
        trainer.train_step()
    assert (torch.bfloat16 in dtypes.seen) is (amp == "bf16")  # the probe sees bf16 when there


def _encoder():
    torch.manual_seed(0)
    return build_backbone("resnet_small", in_channels=3, width=0.25, mean=(0.5,), std=(0.25,))


def test_channels_last_features_equal_contiguous_ones(one_thread):
    """The extractor's channels-last input (and channels-last weights, as trained) give the
    features of the plain contiguous fp32 forward, up to the order of float sums."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8, generator=gen)
    encoder = _encoder().eval()
    extractor = FeatureExtractor(encoder, size=32, channels=3)
    with torch.no_grad():
        plain = encoder(extractor.preprocess(images.float() / 255).contiguous())
    fast = extract_features(encoder, images, ExtractOptions(32, channels=3))
    weights_cl = extract_features(
        _encoder().eval().to(memory_format=torch.channels_last),
        images,
        ExtractOptions(32, channels=3),
    )
    # float32 sums in another order: a few units in the last place of the largest features
    tol = 1e-5 * float(plain.abs().max())
    for got in (fast, weights_cl):
        assert got.dtype == torch.float32
        assert torch.allclose(got, plain, rtol=1e-4, atol=tol), float((got - plain).abs().max())


def test_scores_ignore_a_callers_autocast(one_thread):
    """Feature extraction and scoring stay fp32 under a bf16 autocast: the same scores, bit for
    bit, and float32 features (what attacks and the ONNX export differentiate / trace)."""
    gen = torch.Generator().manual_seed(1)
    bank = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=gen)
    extractor = FeatureExtractor(_encoder().eval(), size=32, channels=3)
    scorer = VariantScorer("knn_cos", {"k": 3}, "angled")
    banks = {a: extractor.extract(bank, angle=a) for a in scorer.angles}
    scorer.fit(banks)
    x = torch.rand(6, 1, 28, 28, generator=gen, requires_grad=True)
    plain = scorer(extractor, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = scorer(extractor, x)
        feats = extractor(x)
    assert feats.dtype == torch.float32 and under.dtype == plain.dtype
    assert torch.equal(plain, under)
    (grad,) = torch.autograd.grad(under.sum(), x)
    assert grad.dtype == torch.float32


def test_doctor_prints_what_decides_numerics(capsys):
    assert main(["doctor", "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["amp_auto"] == resolve_amp("auto", "cpu")[0]
    assert report["threads"] == torch.get_num_threads()
    for key in ("bf16_native", "avx512_bf16", "amx", "interop_threads", "env"):
        assert key in report
    assert main(["doctor", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "train.amp: auto" in text and "ATen CPU capability" in text


def test_version_stays_light():
    code = (
        "import sys; from firmad.cli import main; code = main(['--version']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("firmad ")


@pytest.mark.parametrize(("given", "want"), [("on", "on"), ("off", "off"), ("'off'", "off")])
def test_channels_last_takes_a_bare_on_or_off(given, want):
    # YAML would read them as booleans
    assert load_config("fmnist-cpu", [f"train.channels_last={given}"]).train.channels_last == want
