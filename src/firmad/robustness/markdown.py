"""The Markdown of robustness results: the sweep's table (`format_markdown`) with its checks
and decisions at the detector's threshold, and an audit's attack.md (`attack_markdown`)."""

from __future__ import annotations

from typing import Any

from firmad.perturb import attack_name

__all__ = ["AUROC_PNG", "EXAMPLES_PNG", "attack_markdown", "format_markdown", "resumed_text"]

AUROC_PNG = "attack_auroc.png"
EXAMPLES_PNG = "attack_examples.png"


def _eps_text(eps: float, norm: str) -> str:
    if eps == 0:
        return "0 (clean)"
    k = eps * 255
    if norm == "linf" and abs(k - round(k)) < 1e-6:
        return f"{int(round(k))}/255"
    return f"{eps:.4g}"


def format_markdown(result: dict) -> str:
    """A Markdown table (rows: ε, columns: target modes; AUROC % [95 % CI]), the decisions at
    the detector's threshold when it has one, and the verdicts."""
    st = result["settings"]
    modes = st["targets_list"]
    sub = result["subset"]
    lines = [
        f"Robust AUROC, {st['norm']} {attack_name(st)}-{st['steps']} x {st['restarts']} "
        "restart(s), "
        f"step {st['step_size']}, eot {st['eot']}, n = {sub['n']} "
        f"({sub['n_normal']} normal / {sub['n_anomaly']} anomalous), seed {st['seed']}.",
        "",
        "| eps | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for eps in st["eps_list"]:
        cells = []
        for mode in modes:
            r = next(r for r in result["rows"] if r["eps"] == eps and r["target"] == mode)
            cells.append(
                f"{100 * r['auroc']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
            )
        lines.append(f"| {_eps_text(eps, st['norm'])} | " + " | ".join(cells) + " |")
    lines += _decision_lines(result)
    if result["verdicts"] or result["checks_skipped"]:
        lines.append("")
        lines.append("Strength checks:")
        for v in result["verdicts"]:
            mark = "pass" if v["passed"] else "FAIL"
            lines.append(f"- {mark} `{v['name']}`: {v['detail']}")
        for name in result["checks_skipped"]:
            lines.append(f"- not run `{name}`")
    return "\n".join(lines) + "\n"


def _decision_lines(result: dict) -> list[str]:
    """Decisions at the detector's threshold: flagged counts, and what the attack flipped."""
    t = result.get("threshold")
    if t is None:
        note = result.get("threshold_note")
        return ["", f"Decisions: {note}"] if note else []
    st, sub = result["settings"], result["subset"]
    nn, na = sub["n_normal"], sub["n_anomaly"]
    lines = [
        "",
        f"Decisions at the detector's threshold ({t:.6g}; flagged = score above it):",
        "",
        "| eps | attacked | normals flagged | anomalies flagged | normals pushed over | "
        "anomalies pulled under |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = [result["clean"]] + [r for r in result["rows"] if r["eps"] > 0]
    for r in rows:
        d = r.get("decisions")
        if d is None:
            continue
        clean = r["target"] == "clean"
        lines.append(
            f"| {_eps_text(r['eps'], st['norm'])} | {'-' if clean else r['target']} | "
            f"{d['normals_flagged']}/{nn} | {d['anomalies_flagged']}/{na} | "
            f"{'-' if clean else d['normals_pushed_over']} | "
            f"{'-' if clean else d['anomalies_pulled_under']} |"
        )
    return lines


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def attack_markdown(result: dict[str, Any]) -> str:
    """attack.md: the detector, the robust AUROC table with intervals, the checks, the plots."""
    d = result["detector"]
    adv = d.get("adversarial_training")
    trained = (
        f"adversarially trained ({adv['norm']} eps={adv['eps']:.4g}, {adv['steps']} step(s))"
        if adv
        else "standard training"
    )
    params = ", ".join(f"{k}={v}" for k, v in d["scorer_params"].items())
    lines = [
        "# Robustness audit",
        "",
        f"- Detector: {d['method']} / {d['backbone']} (width {d['width']}), {trained}",
        f"- Scorer: {d['scorer']}" + (f" ({params})" if params else "") + f", {d['variant']}",
        f"- Input: {' x '.join(map(str, d['input']))}; encoder {_human(d['params'])} parameters, "
        f"{_human(d['flops'])}FLOPs per image",
    ]
    if d.get("source"):
        lines.append(f"- Source: {d['source']}")
    st = result["settings"]
    if st.get("threat_model"):
        lines.append(f"- Threat model: {st['threat_model']}")
    if isinstance(st.get("surrogates"), list):
        lines.append("- Surrogate gradients: " + ", ".join(st["surrogates"]))
    resumed = result.get("resumed")
    if resumed:
        lines.append(f"- Resumed: {resumed_text(resumed)}")
    lines += ["", format_markdown(result).rstrip(), ""]
    lines += [f"![AUROC vs eps]({AUROC_PNG})", "", f"![Examples]({EXAMPLES_PNG})", ""]
    return "\n".join(lines)


def resumed_text(resumed: dict) -> str:
    """What a resumed audit took from its earlier run, in words."""
    parts = []
    if resumed.get("reused_attacks"):
        names = ", ".join(resumed["reused_attacks"])
        parts.append(f"reused {len(resumed['reused_attacks'])} finished attack(s) ({names})")
    for c in resumed.get("continued", []):
        parts.append(
            f"continued {c['attack']} after {c['batches_kept']} of {c['batches']} finished batches"
        )
    return "; ".join(parts) or "nothing reused"
