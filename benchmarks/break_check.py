"""Do the tests still catch regressions? Each entry of MUTATIONS breaks one guarded function
once -- an off-by-one, a rounding mode, a constant moved by 1e-3 relative, an unfused
multiply-add, a lost state -- and runs the few tests that guard it against the broken code.

    python benchmarks/break_check.py               # every mutation, then a markdown table
    python benchmarks/break_check.py --only NAME   # one (or several: --only A --only B)
    python benchmarks/break_check.py --list        # the mutations, nothing run

The working tree is never edited: src/ is copied to a temporary folder, the fragment replaced
there, and pytest runs in a subprocess with that copy first on PYTHONPATH (the tests are the
repository's own). An interrupted run leaves nothing broken behind. A mutation is *caught* when
its tests fail (pytest exit 1), *missed* when they pass (exit 0); anything else (a collection
error, a timeout) is an *error*. First, the same tests run on the unmutated copy (the control:
a test that fails already proves nothing); ``--no-control`` skips that. Exit status 1 when a
mutation is missed or a run went wrong.

Tests are listed most portable first (the records of tests/golden_*.py, the same-process
comparisons); pytest runs them in that order and stops at the first failure (-x), so the
"caught by" column names the first guard that fails, and every test before it passed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under src/firmad
    function: str
    fragment: str  # occurs exactly once in the file
    replacement: str
    tests: tuple[str, ...]
    what: str  # the break, in words


GL = "tests/test_golden_losses.py::test_first_steps_match_the_record"
GA = "tests/test_golden_attacks.py::test_attack_results_match_the_record"
SF = "tests/test_sync_free.py"

MUTATIONS = [
    Mutation(
        "split-subsample-shift", "data/protocol.py", "subsample_indices",
        "torch.randperm(n, generator=gen)[:max_n].sort().values",
        "torch.randperm(n, generator=gen)[1 : max_n + 1].sort().values",
        ("tests/test_protocol.py::test_subsampling_sizes_and_stratification",
         "tests/test_protocol.py::test_subsampling_is_deterministic", f"{GL}[firm]",
         "tests/test_protocol.py::test_which_images_a_subsample_keeps_is_stored_exactly"),
        "max_train keeps permutation entries 1..n instead of 0..n-1 (same size, other images)",
    ),
    Mutation(
        "split-stratified-remainder", "data/protocol.py", "stratified_indices",
        "quota[order[:leftover]] += 1",
        "quota[order[1 : leftover + 1]] += 1",
        ("tests/test_protocol.py::test_stratified_largest_remainder",
         "tests/test_protocol.py::test_subsampling_sizes_and_stratification"),
        "the leftover places go to the 2nd..(k+1)th largest remainders (total size kept)",
    ),
    Mutation(
        "pool-round-half-even", "data/pool.py", "prepare_images",
        "(x * 255 + (0.5 + 1e-7)).floor_()",
        "(x * 255).round_()",
        (f"{GL}[firm]",),
        "resized pixels round half to even instead of ties up (a rounding mode)",
    ),
    Mutation(
        "view-crop-top-off-by-one", "imageops.py", "rrc_boxes",
        "torch.floor(u[:, 20] * (H - h + 1))",
        "torch.floor(u[:, 20] * (H - h))",
        (f"{GL}[firm]", f"{SF}::test_device_view_parameters_equal_the_host_ones"),
        "a random crop's top row is drawn from H - h places instead of H - h + 1",
    ),
    Mutation(
        "view-jitter-1e-3", "augment.py", "ViewAugment._params",
        "factors = lo + span * u[:, 23:27]",
        "factors = lo + span * 1.001 * u[:, 23:27]",
        (f"{GL}[firm]",),
        "colour-jitter factors' spread 1e-3 relative wider",
    ),
    Mutation(
        "idx-column-major", "data/idx.py", "read_idx",
        "return np.frombuffer(data, dtype=np.uint8).reshape(dims)",
        "return np.frombuffer(data, dtype=np.uint8).reshape(dims)"
        ".transpose(0, *range(len(dims) - 1, 0, -1))",
        (f"{GL}[firm]", "tests/test_data.py::test_idx_raw_and_gz",
         "tests/test_data.py::test_idx_write_read_roundtrip_is_deterministic"),
        "IDX images read column-major (each image transposed; square ones keep their shape)",
    ),
    Mutation(
        "loss-temperature-1e-3", "losses.py", "similarity_logits",
        "return z1 @ z2.T / tau",
        "return z1 @ z2.T / (tau * 1.001)",
        (f"{GL}[firm]", "tests/test_losses.py"),
        "the pairwise logits' temperature 1e-3 relative larger (FIRM, NT-Xent)",
    ),
    Mutation(
        "loss-lone-positive-halved", "losses.py", "contrastive_loss",
        "n_pos.clamp(min=1.0)",
        "n_pos.clamp(min=2.0)",
        (f"{GL}[firm]", "tests/test_losses.py"),
        "an anchor with one positive (FIRM's outliers) counts half",
    ),
    Mutation(
        "sgd-unfused-update", "training/sync_free.py", "SyncFreeStep._sgd_update",
        'torch._foreach_addcmul_(params, bufs, [sf["neg_lr"]] * len(params))',
        'torch._foreach_add_(params, torch._foreach_mul(bufs, sf["neg_lr"]))',
        (f"{SF}::test_sync_free_update_is_sgds_bit_for_bit",
         f"{SF}::test_sync_free_step_gives_the_eager_weights"),
        "p - lr * buf as a multiply then an add (two roundings) instead of one fused step",
    ),
    Mutation(
        "knn-k-off-by-one", "scoring/scorers.py", "KnnCosScorer.mean_topk",
        "knn_similarities(self.bank_, l2_normalise(x), self.k, self.knn_backend)",
        "knn_similarities(self.bank_, l2_normalise(x), self.k + 1, self.knn_backend)",
        ("tests/test_golden_losses.py::test_fixture_aurocs_match_the_record[firm-all-scorers]",
         "tests/test_scoring.py::test_knn_cos_values"),
        "kNN averages k + 1 neighbours",
    ),
    Mutation(
        "attack-step-1e-3", "perturb/spec.py", "default_step",
        "2.5 * eps / steps",
        "2.5025 * eps / steps",
        (f"{GA}[pgd_l2_normal]", f"{GA}[pgd_linf]"),
        "PGD's default step 2.5 eps / steps 1e-3 relative larger",
    ),
    Mutation(
        "apgd-momentum-constant", "robustness/walks.py", "walk_apgd",
        "APGD_MOMENTUM = 0.75",
        "APGD_MOMENTUM = 0.76",
        (f"{GA}[apgd]", f"{GA}[sweep_apgd_l2]"),
        "APGD's momentum weight 0.75 -> 0.76",
    ),
    Mutation(
        "resume-forgets-permutation", "training/trainer.py", "Trainer.load_state",
        'self.perm = tensors["epoch_perm"].to(self.device) if "epoch_perm" in tensors else None',
        "self.perm = None",
        ("tests/test_train.py::test_resume_is_identical_to_an_uninterrupted_run",),
        "a run resumed mid-epoch draws a new epoch permutation",
    ),
    Mutation(
        "detector-saves-float32-bank", "persistence.py", "_tensors_of",
        "return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}",
        "return {k: (v.float() if v.dtype == torch.float64 else v).detach().contiguous().cpu()"
        " for k, v in tensors.items()}",
        ("tests/test_detector.py::test_save_load_round_trip",),
        "a saved detector's float64 scorer state (the kNN bank) stored as float32",
    ),
    Mutation(
        "together-shared-generator", "training/trainer.py", "Trainer.__init__",
        "self.gen = torch.Generator(self.device).manual_seed(settings.seed)",
        "self.gen = torch.default_generator.manual_seed(settings.seed)",
        (f"{SF}::test_two_models_trained_together_equal_each_trained_alone",),
        "every trainer draws from torch's one global generator (models trained together "
        "interleave their draws)",
    ),
    Mutation(
        "together-stops-at-first", "training/together.py", "fit_together",
        "while not all(t.finished for t in trainers)",
        "while not any(t.finished for t in trainers)",
        (f"{SF}::test_two_models_trained_together_equal_each_trained_alone",),
        "training together stops when the first model finishes",
    ),
]  # fmt: skip


def check_fragment(m: Mutation, src: Path) -> str:
    """The mutated text of ``m``'s file under ``src`` (src/firmad's parent); ValueError if the
    fragment does not occur exactly once, or the result does not compile."""
    path = src / "firmad" / m.file
    text = path.read_text()
    n = text.count(m.fragment)
    if n != 1:
        raise ValueError(f"{m.name}: the fragment occurs {n} times in src/firmad/{m.file}")
    mutated = text.replace(m.fragment, m.replacement)
    compile(mutated, str(path), "exec")
    return mutated


def copy_src(dest: Path) -> Path:
    src = dest / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return src


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[int, str, float]:
    """pytest on ``tests`` with ``src`` first on the path: (exit code, output, seconds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *PYTEST, *tests], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s", time.perf_counter() - start
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def imported_from(src: Path) -> str:
    """Where a subprocess with ``src`` first on the path imports firmad from."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import firmad, pathlib; print(pathlib.Path(firmad.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def first_failure(output: str) -> str:
    """The node id of the first FAILED / ERROR line of pytest's summary."""
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return found.group(1) if found else "?"


def break_one(m: Mutation) -> dict:
    """Apply ``m`` in a fresh copy of src/ and run its tests; the row of the table."""
    with tempfile.TemporaryDirectory(prefix="break-check-") as tmp:
        src = copy_src(Path(tmp))
        (src / "firmad" / m.file).write_text(check_fragment(m, src))
        rc, output, seconds = run_tests(src, m.tests)
    verdict = {0: "missed", 1: "caught"}.get(rc, "error")
    row = {"mutation": m, "verdict": verdict, "rc": rc, "seconds": seconds}
    row["by"] = first_failure(output) if verdict == "caught" else ""
    if verdict == "error":
        row["tail"] = output[-2000:]
    return row


def control(mutations: list[Mutation]) -> bool:
    """Every listed test passes on the unmutated copy (and firmad is imported from it)."""
    tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="break-check-") as tmp:
        src = copy_src(Path(tmp))
        where = imported_from(src)
        if not where.startswith(str(src.resolve())):
            print(f"firmad is imported from {where}, not the copy: check PYTHONPATH / the install")
            return False
        rc, output, seconds = run_tests(src, tests)
    print(f"control: {len(tests)} tests on the unmutated copy: exit {rc} in {seconds:.0f} s")
    if rc != 0:
        print(output[-3000:])
    return rc == 0


def _short(node: str) -> str:
    return node.removeprefix("tests/").replace(".py::", "::")


def table(rows: list[dict]) -> str:
    lines = [
        "| mutation | function (src/firmad/…) | the break | tests run | caught? | s |",
        "|---|---|---|---|---|---:|",
    ]
    for r in rows:
        m = r["mutation"]
        tests = "<br>".join(_short(t) for t in m.tests)
        verdict = r["verdict"]
        if verdict == "caught":
            verdict = f"**caught** by {_short(r['by'])}"
        elif verdict == "missed":
            verdict = "**MISSED**"
        else:
            verdict = f"error (exit {r['rc']})"
        lines.append(
            f"| {m.name} | `{m.function}` ({m.file}) | {m.what} | {tests} | {verdict} "
            f"| {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run this mutation only")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--no-control", action="store_true", help="skip the unmutated control run")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            ap.error(f"unknown mutation(s) {unknown}; see --list")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    for m in chosen:  # every fragment first: a stale one stops the run before any test
        check_fragment(m, ROOT / "src")
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.function} ({m.file}): {m.what}\n    tests: {' '.join(m.tests)}")
        return 0
    if not args.no_control and not control(chosen):
        print("the control failed: fix the tests before breaking the code")
        return 1
    rows = []
    for m in chosen:
        rows.append(break_one(m))
        r = rows[-1]
        print(f"{m.name}: {r['verdict']} {r['by']} ({r['seconds']:.0f} s)", flush=True)
        if "tail" in r:
            print(r["tail"])
    print()
    print(table(rows))
    return 0 if all(r["verdict"] == "caught" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
