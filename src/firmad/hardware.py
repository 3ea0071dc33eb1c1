"""What decides numerics here: the CPU's bf16 support as torch will use it, ATen's kernel level,
threads and deterministic flags (`firmad doctor` prints them; runs record their part).

``train.amp: auto`` trains with bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16
or AMX) *and* torch runs its AVX-512 kernels there, in fp32 elsewhere. Both conditions are
checked, so the variables that make torch act as an older CPU also move the choice:

- ``ATEN_CPU_CAPABILITY=default|avx2|avx512``: the level of ATen's own vectorised kernels
  (element-wise ops, reductions, batch norm...). Below ``avx512``, auto picks fp32.
- ``DNNL_MAX_CPU_ISA`` (or ``ONEDNN_MAX_CPU_ISA``), e.g. ``AVX2``: the highest instruction set
  oneDNN's convolutions and matrix products may use. Below ``AVX512_CORE_BF16``, auto picks fp32.

Everything here is light (torch is imported when a function is called).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
# The environment variables that change which kernels torch runs, hence the numbers.
NUMERICS_ENV = (
    "ATEN_CPU_CAPABILITY",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
)
# oneDNN instruction-set caps that still hold bf16 dot products (AVX-512 BF16, AMX, AVX10).
_DNNL_BF16 = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


@dataclass(frozen=True)
class Bf16Support:
    """Whether bf16 autocast runs on native instructions here, and why (one sentence)."""

    native: bool
    reason: str


def bf16_support(
    cpu_bf16: bool, cpu_amx: bool, capability: str, dnnl_max_isa: str | None
) -> Bf16Support:
    """The decision from its inputs: the CPU's flags (AVX-512 BF16, AMX), ATen's capability in
    use (``torch.backends.cpu.get_cpu_capability()``) and oneDNN's cap (``DNNL_MAX_CPU_ISA``)."""
    if not (cpu_bf16 or cpu_amx):
        return Bf16Support(False, "the CPU has neither AVX-512 BF16 nor AMX")
    if not capability.upper().startswith("AVX512"):
        return Bf16Support(
            False,
            f"torch runs its {capability} kernels (ATEN_CPU_CAPABILITY), below AVX-512",
        )
    isa = (dnnl_max_isa or "").strip().upper()
    if isa and not isa.startswith(_DNNL_BF16):
        return Bf16Support(False, f"oneDNN is held at {isa} (DNNL_MAX_CPU_ISA), below bf16")
    what = "AMX" if cpu_amx else "AVX-512 BF16"
    return Bf16Support(True, f"the CPU computes bf16 natively ({what}) with AVX-512 kernels")


def _cpuinfo_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_flags() -> dict[str, bool]:
    """``{"avx512_bf16": ..., "amx": ...}``: what the CPU itself has (not what torch is allowed
    to use), from torch's cpuinfo, else from /proc/cpuinfo."""
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None and amx is not None:
        return {"avx512_bf16": bool(probe()), "amx": bool(amx())}
    flags = _cpuinfo_flags()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags}


def cpu_capability() -> str:
    """ATen's CPU capability in use (DEFAULT, AVX2, AVX512...), after ATEN_CPU_CAPABILITY."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def dnnl_max_isa() -> str | None:
    return os.environ.get("DNNL_MAX_CPU_ISA") or os.environ.get("ONEDNN_MAX_CPU_ISA") or None


def cpu_bf16() -> Bf16Support:
    """Whether bf16 autocast is native on this CPU as torch runs here."""
    flags = cpu_flags()
    return bf16_support(flags["avx512_bf16"], flags["amx"], cpu_capability(), dnnl_max_isa())


def resolve_amp(amp: str, device) -> tuple[str, str]:
    """``train.amp`` resolved for ``device``: (``none`` | ``bf16`` | ``fp16``, why).

    ``auto``: bf16 on a CUDA GPU with native bf16 and on a CPU with it (`cpu_bf16`), else none
    (fp32). Any other value is kept as set."""
    import torch

    if amp != "auto":
        return amp, f"train.amp={amp}"
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        gpu = "the GPU computes bf16 natively" if native else "the GPU has no native bf16"
        return ("bf16" if native else "none"), f"auto: {gpu}"
    if device.type == "cpu":
        support = cpu_bf16()
        return ("bf16" if support.native else "none"), f"auto: {support.reason}"
    return "none", f"auto: fp32 on {device.type}"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def run_numerics(amp: str, amp_reason: str, channels_last: bool) -> dict[str, Any]:
    """What a run records of its numerics: the precision it trained in and why, the memory
    layout, ATen's capability and the threads."""
    import torch

    return {
        "amp": amp,
        "amp_reason": amp_reason,
        "channels_last": bool(channels_last),
        "cpu_capability": cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def numerics_report(device="cpu") -> dict[str, Any]:
    """Everything `firmad doctor` prints for ``device`` (a torch device or its name)."""
    import torch

    from firmad.versions import __version__

    flags = cpu_flags()
    support = cpu_bf16()
    amp, reason = resolve_amp("auto", device)
    return {
        "firmad": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_capability": cpu_capability(),
        "avx512_bf16": flags["avx512_bf16"],
        "amx": flags["amx"],
        "bf16_native": support.native,
        "device": str(device),
        "amp_auto": amp,
        "amp_auto_reason": reason,
        "channels_last_auto": "on",
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        **(_cuda_report(device) if torch.device(device).type == "cuda" else {}),
        "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
    }


def _cuda_report(device) -> dict[str, Any]:
    """The GPU and what changes its float32 maths (TF32 matrix products and convolutions)."""
    import torch

    return {
        "gpu": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }
