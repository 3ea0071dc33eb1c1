"""study.md: the verdicts with the rule and its inputs, the levels of every set, and the
records of every construction, floor and model."""

from __future__ import annotations

from typing import Any

from firmad.robustness.study.stats import QUESTIONS, RULE

TITLES = {
    "one_class": "The paper's question: are non-robust features useful for the one-class task? "
    "(one-class branch: FIRM + kNN trained on D_NR)",
    "robust_features": "Robust features (one-class branch: FIRM + kNN trained on D_R)",
    "binary": "The binary surrogate (binary classifiers trained on D_det / D_rand)",
}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _interval(i: dict, signed: bool = False) -> str:
    if i["mean"] is None:
        return "–"
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    if i["lo"] is None:
        return f(i["mean"])
    return f"{f(i['mean'])} [{f(i['lo'])}, {f(i['hi'])}]"


def study_markdown(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    lines = [f"# Robust / non-robust feature study: {s['name']}", "", _settings_line(results), ""]
    if s.get("one_class_seeds") is not None and "one_class" in s["branches"]:
        lines += [f"The one-class branch ran on seeds {s['one_class_seeds']} only.", ""]
    if s["reductions"]:
        lines += ["Reductions from the full-scale settings: " + "; ".join(s["reductions"]), ""]
    lines += _verdict_lines(results)
    lines += _inputs_table(summary)
    lines += _levels_table(summary)
    lines += _init_lines(summary)
    lines += _timing_lines(summary)
    lines += _construction_lines(results)
    lines += _floor_lines(results)
    lines += _inversion_lines(results)
    lines += ["", "## Dropped sets", ""]
    lines += [f"- {k}: {v}" for k, v in results["dropped_sets"].items()]
    return "\n".join(lines) + "\n"


def _settings_line(results: dict) -> str:
    s = results["settings"]
    attack = ("APGD" if s["attack_schedule"] == "apgd" else "PGD") + f"-{s['attack_steps']}"
    transfer = (
        f" Transfer variant: fresh models of {s['transfer_backbone']} on "
        f"{', '.join(s['transfer_sets'])}."
        if s["transfer_backbone"]
        else ""
    )
    return (
        f"Recipes {s['recipe']} (one-class) and {s['binary_recipe']} (binary), backbone "
        f"{s['backbone']}, classes {s['classes']}, seeds {s['seeds']}; every model trained for "
        f"{s['train_steps']} SGD steps (the binary robust reference: "
        f"{s['reference_steps'] or s['train_steps']}), every model on a constructed set or a "
        f"control from its own init seed.{transfer} Clean AUROC on each class's full test "
        f"split; attacked: {s['attack_norm']} {attack} both sides on {s['attack_subset']} "
        "stratified test images (exact score, the detector's surrogates and a pixel-space "
        f"target; strongest per image). Wall time {results.get('wall_time_s')} s."
    )


def _views(summary: dict) -> list[tuple[str, str]]:
    """(key, name) of the summary's views: clean, transfer, attacked."""
    keys = [k for k in next(iter(summary["groups"].values())) if k != "seeds"]
    names = {"sets clean": "clean", "transfer clean": "transfer, clean"}
    return [(k, names.get(k, f"attacked, eps {k.split(' ', 1)[1]}")) for k in keys]


def _verdict_lines(results: dict) -> list[str]:
    summary, groups = results["summary"], results["summary"]["groups"]
    lines = [
        "## Verdicts",
        "",
        f"The rule: {RULE}",
        "",
        f"Intervals: {100 * summary['confidence']:.0f} % t-intervals over the seeds of a "
        "class; pooled, over the class means (classes are a random effect: a pooled claim "
        "rests on the classes, not on the cells).",
        "",
        "| question | view | " + " | ".join(_group_name(g) for g in groups) + " |",
        "|---|---|" + "---|" * len(groups),
    ]
    for question in QUESTIONS:
        for view, vname in _views(summary):
            cells = [groups[g][view]["answers"].get(question) for g in groups]
            if any(c is not None for c in cells):
                text = " | ".join("–" if c is None else f"**{c}**" for c in cells)
                lines.append(f"| {QUESTIONS[question]} | {vname} | {text} |")
    chance = [
        f"{_group_name(g)} {_interval(e['sets clean']['levels']['shuffle'])}"
        for g, e in groups.items()
        if "shuffle" in e["sets clean"]["levels"]
    ]
    if chance:
        lines += [
            "",
            f"Chance is {100 * summary['chance']:.0f}; this pipeline's own chance "
            "level, the clean AUROC of the shuffle control (labels that carry nothing): "
            + ", ".join(chance)
            + ".",
        ]
    floors = summary["floors"]
    if not floors["general_claim_allowed"]:
        lines += [
            "",
            f"{floors['classes']} class(es), at least {floors['seeds_min']} seed(s) "
            "each: below the floors for a general claim (>= 3 classes, >= 5 seeds); "
            "not a general result.",
        ]
    for question in QUESTIONS:
        block = _question_lines(summary, question, "sets clean")
        if block:
            lines += ["", f"### {TITLES[question]}", "", *block]
    stopped = [
        f"- {key} {b}: {m}"
        for key, r in results["cells"].items()
        for b in ("binary", "one_class")
        for m in r.get(b, {}).get("stopped", {}).values()
    ]
    if stopped:
        lines += ["", "### Stopped stages", "", *stopped]
    return lines + [""]


def _group_name(group: str) -> str:
    return "pooled" if group == "pooled" else f"class {group}"


def _question_lines(summary: dict, question: str, view: str) -> list[str]:
    """Each group's answer to a question with the rule's inputs of its key sets."""
    lines = []
    for gname, entry in summary["groups"].items():
        part = entry[view]
        if question not in part["answers"]:
            continue
        detail = "; ".join(
            f"{n}: {part['sets'][n]['verdict']} ({_inputs(part['sets'][n])})"
            for n in _key_sets(question, part["sets"])
        )
        head = _group_name(gname) + (
            "" if gname == "pooled" else f" ({len(entry['seeds'])} seed(s))"
        )
        lines.append(f"- {head}: **{part['answers'][question]}** — {detail}")
    return lines


def _key_sets(question: str, sets: dict) -> list[str]:
    prefix = {"one_class": "D_NR-", "robust_features": "D_R-"}.get(question)
    if prefix is None:
        return [n for n in ("D_det", "D_rand") if n in sets]
    return [n for n in sets if n.startswith(prefix)]


def _inputs(entry: dict) -> str:
    parts = [f"own {_interval(entry['own'])}"]
    parts += [f"minus {k} {_interval(d, signed=True)}" for k, d in entry["diffs"].items()]
    if "why" in entry:
        parts.append(entry["why"])
    return ", ".join(parts)


def _inputs_table(summary: dict) -> list[str]:
    lines = [
        "## The rule's inputs (AUROC points, mean [95 % interval])",
        "",
        "| group | view | set | cells passed / run | own | minus each control | verdict |",
        "|---|---|---|---:|---:|---|---|",
    ]
    for gname, entry in summary["groups"].items():
        for view, vname in _views(summary):
            for name, e in entry[view]["sets"].items():
                diffs = "; ".join(
                    f"{k}: {_interval(d, signed=True)}" for k, d in e["diffs"].items()
                )
                lines.append(
                    f"| {gname} | {vname} | {name} | {e['cells_passed']} / {e['cells_run']}"
                    f" | {_interval(e['own'])} | {diffs} | {e['verdict']} |"
                )
    return lines


def _levels_table(summary: dict) -> list[str]:
    lines = [
        "",
        "## AUROC % of the model trained on each set (mean [95 % interval])",
        "",
        f"Chance is {100 * summary['chance']:.0f}; the pipeline's own chance level is the "
        "shuffle control's (labels that carry nothing), shown beside it. Ceilings: "
        f"{', '.join(summary['ceilings'].values())} (real data, not controls).",
        "",
        "| group | view | set | AUROC |",
        "|---|---|---|---:|",
    ]
    for gname, entry in summary["groups"].items():
        for view, vname in _views(summary):
            for name, i in entry[view]["levels"].items():
                note = " (the pipeline's chance)" if name == "shuffle" else ""
                lines.append(f"| {gname} | {vname} | {name}{note} | {_interval(i)} |")
    return lines


def _init_lines(summary: dict) -> list[str]:
    f = summary["fresh_inits"]
    return [
        "",
        "## Fresh initialisations",
        "",
        f"{f['fresh_models']} models trained on constructed sets or controls, each from its "
        f"own init seed; {f['differ_from_sources']} of them start from initial weights (and "
        "a seed) that differ from every source model of their cell (init seeds and "
        "initial-weight digests per model in study.json).",
    ]


def _timing_lines(summary: dict) -> list[str]:
    t = summary["timing"]
    lines = [
        "",
        "## Time per cell (seconds; CPU: all threads of the cell's process)",
        "",
        "| cell | wall | CPU | training CPU | testing CPU | constructions CPU |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in t["cells"].items():
        lines.append(
            f"| {key} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['train_cpu_s']:.0f} | "
            f"{r['test_cpu_s']:.0f} | {r['construct_cpu_s']:.0f} |"
        )
    if t["cpu_s_median"]:
        lines += [
            "",
            f"Median CPU seconds per cell: {t['cpu_s_median']:.0f} (wall time on a "
            "machine shared with other work says little; CPU time extrapolates: n cells "
            "on c fully used cores take about n x this / c seconds).",
        ]
    return lines


def _construction_lines(results: dict) -> list[str]:
    lines = [
        "",
        "## Constructions of the binary branch (per cell)",
        "",
        "| cell | set | L2 eps | reach, relabelled: to outlier / to normal | radii tried | "
        "reference: held-out balanced accuracy / kept (relabelled) | survival | noise "
        "control: median norm, achieved / target |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for key, r in results["cells"].items():
        for name, m in r.get("binary", {}).get("constructions", {}).items():
            tried = ", ".join(
                f"{a['eps']:g}: {_pct(a['to_outlier'])}/{_pct(a['to_normal'])}"
                for a in m["attempts"]
            )
            ref, surv, noise = m["reference"], m["survival"], m["noise_control"]
            survival = _pct(surv["share"]) if surv["measured"] else "not measured (plain views)"
            lines.append(
                f"| {key} | {name} | {m['eps']:g} | {_pct(m['reach']['to_outlier'])} / "
                f"{_pct(m['reach']['to_normal'])} | {tried} | "
                f"{_pct(ref['held_out_balanced_accuracy'])} / "
                f"{_pct(ref['kept_among_relabelled_clean_correct'])} | {survival} | "
                f"{noise['norm_median']:.2f}, {noise['achieved_over_target_median'] or 0:.3f} |"
            )
    return lines


def _floor_lines(results: dict) -> list[str]:
    lines = [
        "",
        "## The robust encoder's floor (one-class branch, per cell)",
        "",
        "| cell | eps | robust | standard | gain | strength checks | passed |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for key, r in results["cells"].items():
        f = r.get("one_class", {}).get("robust_floor")
        if f is None:
            continue
        gain = "–" if f["gain"] is None else f"{100 * f['gain']:+.1f}"
        lines.append(
            f"| {key} | {f['eps']:g} | {_pct(f['robust'])} | {_pct(f['standard'])} | "
            f"{gain} (floor {100 * f['margin']:+.0f}) | {f['checks_passed']} | "
            f"{f['passed']} |"
        )
    return lines


def _inversion_lines(results: dict) -> list[str]:
    lines = [
        "",
        "## Inversions (one-class branch, per cell; stored uint8 images)",
        "",
        "| cell | set | reachability: median ratio (reached) | median final/initial | "
        "closer than the nearest other normal | converged | seconds |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for key, r in results["cells"].items():
        oc = r.get("one_class", {})
        for name, m in _inversion_records(oc).items():
            reach = oc.get("reachability", {}).get(name.split("-")[0])
            rtext = "–" if reach is None else f"{reach['median_ratio']:.3f} ({reach['reached']})"
            v = m["convergence"]
            lines.append(
                f"| {key} | {name} | {rtext} | {v['median_ratio']:.3f} | "
                f"{_pct(v['share_below_nearest'])} % | {v['converged']} | "
                f"{m.get('seconds', '–')} |"
            )
    return lines


def _inversion_records(oc: dict) -> dict[str, dict]:
    """Converged inversions (constructions) and the stopped ones' measurements."""
    return {**oc.get("failed_constructions", {}), **oc.get("constructions", {})}
