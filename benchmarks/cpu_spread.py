"""How far the demo's AUROCs move with the CPU's arithmetic: the demo's recipe (what `firmad
demo` runs: fmnist-cpu, class 0, seed 0) trained and evaluated in subprocesses at every
ATEN_CPU_CAPABILITY level x threads, one table of AUROC per scorer and variant with the spread
(max - min) over those runs, and the machine it ran on.

    python benchmarks/cpu_spread.py --out runs/cpu-spread            # 3 levels x threads 1, 2
    python benchmarks/cpu_spread.py --out /tmp/s --smoke             # 1 short epoch, the fixture

Each level also limits oneDNN and MKL as `.ci/run` does (they choose kernels by instruction set
on their own). The runs go one after another (each alone on the machine: a run's threads are
its own), each in OUT/LEVEL-tTHREADS; a finished run is not trained again. Writes
OUT/cpu_spread.json and OUT/cpu_spread.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The same levels as .ci/run and tests/golden_losses.py.
LEVELS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41",
                "MKL_CBWR": "COMPATIBLE"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "native": {},
}  # fmt: skip
DEMO = ["data.normal_class=0", "train.seed=0"]
SMOKE = [
    f"data.root={ROOT / 'tests' / 'fixtures' / 'fashion-mnist'}",
    "train.epochs=1",
    "train.steps_per_epoch=2",
    "data.max_test=100",
]


def machine() -> dict:
    """What decides the numbers besides the code: CPU, torch and its kernels' levels."""
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "native_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
    }


def run_one(out: Path, level: str, threads: int, smoke: bool) -> dict[str, float]:
    """Train and evaluate the demo at one level and thread count; AUROC by result label."""
    run_dir = out / f"{level}-t{threads}"
    results = run_dir / "results.json"
    if not results.exists():
        cmd = [sys.executable, "-m", "firmad", "-q", "train", "--out", str(run_dir)]
        if run_dir.exists():  # stopped before its results: it continues
            cmd.append("--resume")
        else:
            sets = [*DEMO, f"train.threads={threads}", *(SMOKE if smoke else [])]
            cmd += ["--config", "fmnist-cpu"] + [a for s in sets for a in ("--set", s)]
        env = {**os.environ, **LEVELS[level], "OMP_NUM_THREADS": str(threads)}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
        print(f"[{level}, {threads} threads] {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, env=env, check=True)
    rows = json.loads(results.read_text())["results"]
    return {_label(r): r["auroc"] for r in rows}


def _label(row: dict) -> str:
    k = "" if row["k"] is None else f" k={row['k']}"
    return f"{row['scorer']}{k} ({row['variant']})"


def table(runs: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """Markdown: one row per result, one column per run, and the spread (points of AUROC)."""
    names = list(runs)
    lines = [
        "| result | " + " | ".join(names) + " | spread |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    spread = {}
    for row in next(iter(runs.values())):
        values = [runs[n][row] for n in names]
        spread[row] = max(values) - min(values)
        cells = " | ".join(f"{100 * v:.2f}" for v in values)
        lines.append(f"| {row} | {cells} | {100 * spread[row]:.2f} |")
    return "\n".join(lines), spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs and tables")
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="1 short epoch on the fixture")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {
        f"{level}/t{t}": run_one(args.out, level, t, args.smoke)
        for level in args.levels
        for t in args.threads
    }
    md, spread = table(runs)
    info = machine()
    head = (
        f"Demo recipe (fmnist-cpu, class 0, seed 0{', smoke' if args.smoke else ''}); AUROC %; "
        f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} (native "
        f"{info['native_capability']})."
    )
    (args.out / "cpu_spread.md").write_text(head + "\n\n" + md + "\n")
    record = {"machine": info, "smoke": args.smoke, "runs": runs, "spread": spread}
    (args.out / "cpu_spread.json").write_text(json.dumps(record, indent=1) + "\n")
    print(head + "\n\n" + md)


if __name__ == "__main__":
    main()
