"""`firmad doctor`: what decides this machine's numbers (versions, CPU, precision, threads)."""

from __future__ import annotations

import json

import typer

from firmad.cli.common import app, out

# (key, label) in the order printed; keys missing from the report (the GPU's) are skipped.
ROWS = (
    ("firmad", "firmad"),
    ("torch", "torch"),
    ("python", "Python"),
    ("cpu", "CPU"),
    ("cpu_capability", "ATen CPU capability in use"),
    ("avx512_bf16", "CPU has AVX-512 BF16"),
    ("amx", "CPU has AMX"),
    ("bf16_native", "bf16 native here"),
    ("gpu", "GPU"),
    ("cuda", "CUDA"),
    ("cudnn", "cuDNN"),
    ("tf32_matmul", "TF32 matrix products"),
    ("tf32_cudnn", "TF32 convolutions"),
    ("device", "device"),
    ("amp_auto", "train.amp: auto ->"),
    ("amp_auto_reason", "  why"),
    ("channels_last_auto", "train.channels_last: auto ->"),
    ("threads", "threads (intra-op)"),
    ("interop_threads", "threads (inter-op)"),
    ("deterministic_algorithms", "deterministic algorithms"),
    ("cudnn_deterministic", "cudnn.deterministic"),
    ("cudnn_benchmark", "cudnn.benchmark"),
    ("mkldnn", "oneDNN (mkldnn) available"),
)


def _value(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return "fp32 (none)" if v == "none" else str(v)


@app.command(
    epilog="Examples:\n\n  firmad doctor\n\n  firmad doctor --json\n\n"
    "  ATEN_CPU_CAPABILITY=avx2 firmad doctor   # as on a CPU without AVX-512"
)
def doctor(
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Print what decides numerics here: versions, the CPU capability torch uses, native bf16,
    what train.amp auto resolves to, threads, deterministic flags and the variables that
    change them (ATEN_CPU_CAPABILITY, DNNL_MAX_CPU_ISA). Two machines that print the same
    lines train to the same numbers for the same seed."""
    from firmad.hardware import numerics_report
    from firmad.training.model import resolve_device

    report = numerics_report(resolve_device(device))
    if as_json:
        out.print_json(json.dumps(report))
        return
    lines = [f"{label:32s} {_value(report[key])}" for key, label in ROWS if key in report]
    env = report["env"]
    lines += [f"{k:32s} {v}" for k, v in env.items()] or [
        f"{'environment':32s} no ATEN_CPU_CAPABILITY, DNNL_MAX_CPU_ISA or thread variables set"
    ]
    print("\n".join(lines))  # plain: no wrapping of the long lines in a pipe
