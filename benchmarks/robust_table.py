"""One Markdown table from the attack.json files of a robustness grid (one row per cell).

python benchmarks/robust_table.py runs/bench/robust-fmnist-c0-cpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(root: Path) -> str:
    rows, eps_all = [], set()
    for path in sorted(root.glob("*/*/attack.json")):
        result = json.loads(path.read_text())
        both = {r["eps"]: r for r in result["rows"] if r["target"] == "both"}
        eps_all |= {e for e in both if e > 0}
        rows.append((path.parent, result, both))
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
        failed = [v["name"] for v in result["verdicts"] if not v["passed"]]
        if not result["verdicts"]:
            checks = "not run"
        else:
            checks = "passed" if not failed else "failed: " + ", ".join(failed)
        lines.append(
            f"| {cell.parent.name} | {d.get('method')} {d.get('backbone')} {d.get('scorer')} | "
            f"{d.get('params', 0):,} | {d.get('flops', 0) / 1e6:.0f} | "
            f"{'yes' if d.get('adversarial_training') else 'no'} | "
            f"{100 * result['clean']['auroc']:.1f} | " + " | ".join(cells) + f" | {checks} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
