"""One Markdown table from the attack.json files of a robustness grid (one row per cell).

python benchmarks/robust_table.py runs/bench/robust-fmnist-c0-cpu
python benchmarks/robust_table.py --by-class runs/bench/robust-fmnist-10-cpu   (class x recipe)

Under each table: the attack protocol(s) the cells were attacked with, and every cell whose
strength checks failed or were not run (a table is published from the strongest mode with its
checks on: `firmad attack --full`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from firmad.perturb import attack_name


def protocol(result: dict) -> str:
    """How a cell was attacked, in words: e.g. "ensemble APGD-100 x 2 restarts, targeted"."""
    st = result["settings"]
    text = f"{attack_name(st)}-{st['steps']} x {st['restarts']} restart(s)"
    if st.get("targeted"):
        text += ", targeted"
    return text + f", {st['norm']}, n = {result['subset']['n']}"


def checks_text(result: dict) -> str:
    failed = [v["name"] for v in result["verdicts"] if not v["passed"]]
    if not result["verdicts"]:
        return "not run"
    return "passed" if not failed else "failed: " + ", ".join(failed)


def footer(cells) -> list[str]:
    """The protocols used and the cells whose checks did not pass."""
    protocols = sorted({protocol(r) for _, r in cells})
    lines = ["", "Attack: " + "; ".join(protocols) + "."]
    if len(protocols) > 1:
        lines.append("WARNING: the cells were attacked with different protocols.")
    bad = [f"{c.parent.name}/{c.name} ({checks_text(r)})" for c, r in cells
           if checks_text(r) != "passed"]  # fmt: skip
    lines.append("Strength checks: " + ("passed in every cell." if not bad else
                                        "not passed in " + ", ".join(bad) + "."))  # fmt: skip
    return lines


def _attacks(root: Path):
    """(cell directory, attack.json, its both-sides rows by ε) for every cell of a grid."""
    for path in sorted(root.glob("*/*/attack.json")):
        result = json.loads(path.read_text())
        yield path.parent, result, {r["eps"]: r for r in result["rows"] if r["target"] == "both"}


def main(root: Path) -> str:
    rows = list(_attacks(root))
    eps_all = {e for _, _, both in rows for e in both if e > 0}
    eps = sorted(eps_all)
    head = " | ".join(f"both ε={e * 255:.0f}/255" for e in eps)
    lines = [
        f"| recipe | detector | params | MFLOPs | adv. trained | clean | {head} | checks |",
        "|---|---|---:|---:|---|---:|" + "---:|" * len(eps) + "---|",
    ]
    for cell, result, both in rows:
        d = result.get("detector", {})
        cells = []
        for e in eps:
            r = both.get(e)
            cells.append("–" if r is None else f"{100 * r['auroc']:.1f} [{100 * r['ci_low']:.1f}, "
                         f"{100 * r['ci_high']:.1f}]")  # fmt: skip
        checks = checks_text(result)
        lines.append(
            f"| {cell.parent.name} | {d.get('method')} {d.get('backbone')} {d.get('scorer')} | "
            f"{d.get('params', 0):,} | {d.get('flops', 0) / 1e6:.0f} | "
            f"{'yes' if d.get('adversarial_training') else 'no'} | "
            f"{100 * result['clean']['auroc']:.1f} | " + " | ".join(cells) + f" | {checks} |"
        )
    return "\n".join(lines + footer([(c, r) for c, r, _ in rows]))


def by_class(root: Path) -> str:
    """Clean / robust (both sides, the largest ε) AUROC per class and recipe, with the mean."""
    table: dict[str, dict[int, tuple[float, float]]] = {}
    eps_max, cells = None, []
    for cell, result, both in _attacks(root):
        cells.append((cell, result))
        eps_max = max(both)
        normal_class = int(cell.name.split("-c")[-1].split("-s")[0])
        table.setdefault(cell.parent.name, {})[normal_class] = (
            result["clean"]["auroc"],
            both[eps_max]["auroc"],
        )
    recipes = list(table)
    # only classes every recipe has finished, so the means compare like with like
    classes = sorted(set.intersection(*(set(per) for per in table.values())))
    eps_txt = f"{eps_max * 255:.0f}/255"
    head = " | ".join(f"{r} clean | {r} ε={eps_txt}" for r in recipes)
    lines = [f"| class | {head} |", "|---|" + "---:|" * (2 * len(recipes))]
    for c in classes:
        vals = []
        for r in recipes:
            clean, robust = table[r].get(c, (float("nan"), float("nan")))
            vals += [f"{100 * clean:.1f}", f"{100 * robust:.1f}"]
        lines.append(f"| {c} | " + " | ".join(vals) + " |")
    means = []
    for r in recipes:
        got = [table[r][c] for c in classes]
        means += [f"**{100 * sum(v[0] for v in got) / len(got):.1f}**",
                  f"**{100 * sum(v[1] for v in got) / len(got):.1f}**"]  # fmt: skip
    lines.append(f"| mean ({len(classes)} classes) | " + " | ".join(means) + " |")
    return "\n".join(lines + footer(cells))


if __name__ == "__main__":
    if sys.argv[1] == "--by-class":
        print(by_class(Path(sys.argv[2])))
    else:
        print(main(Path(sys.argv[1])))
