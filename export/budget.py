"""The accuracy budget: which pruning ratio may a deployer use and lose at most ``max_drop`` accuracy points?

Pure functions over the rows of an evaluation's ``results.json`` (``export/evaluate.py``: one row per configuration,
each with ``series``, ``ratio``, ``k`` and ``accuracy``; ratio 0 evaluated once, as "unpruned"). Nothing here reads
files or runs models: ``export/budget_io.py`` does that for ``eval_vqa.py --max-drop / --ratios-from`` and
``build.py --ratio-from``.

The rule (:func:`choose_ratio`), per series: a ratio is *within* the budget when its accuracy is at least the
unpruned accuracy minus ``max_drop`` points (1.0 point = 0.01 of the accuracy fraction). The chosen ratio is the
**conservative** one: the largest evaluated ratio r such that *every* evaluated ratio ≤ r of that series is within.
Accuracy need not fall monotonically with the ratio (a noisy subset, a method that happens to keep a useful token
at one ratio only), and a ratio that passes right after one that fails is more likely luck than a safe setting; the
largest ratio that is within, whatever came before, is recorded too (``largest_within``) and shown when it differs.
"""
from __future__ import annotations

import math

from runtime.errors import UsageError

RULE = ("the largest evaluated ratio r such that every evaluated ratio <= r of the series scores at least the "
        "unpruned accuracy minus max_drop points")
TOLERANCE = 1e-9  # accuracies are means of 0/1 scores: a tie with the floor must count as within, whatever rounding


def check_max_drop(max_drop: float, flag: str = "--max-drop") -> float:
    if not isinstance(max_drop, (int, float)) or isinstance(max_drop, bool) or not math.isfinite(max_drop) or max_drop < 0:
        raise UsageError(f"{flag} must be a non-negative number of accuracy points (1.0 = one point), got {max_drop!r}")
    return float(max_drop)


def unpruned_row(results: list[dict]) -> dict:
    """The ratio-0 row, from which drops are measured."""
    row = next((r for r in results if r["ratio"] == 0), None)
    if row is None:
        raise UsageError("no unpruned result (ratio 0) to measure the accuracy drop from: evaluate with 0 among --ratios")
    return row


def series_names(results: list[dict]) -> list[str]:
    """The pruned series, in the order they were evaluated."""
    return list(dict.fromkeys(r["series"] for r in results if r["ratio"] > 0))


def floor(unpruned_accuracy: float, max_drop: float) -> float:
    """The lowest accuracy (a fraction) within the budget."""
    return unpruned_accuracy - max_drop / 100


def within(accuracy: float, unpruned_accuracy: float, max_drop: float) -> bool:
    return accuracy >= floor(unpruned_accuracy, max_drop) - TOLERANCE


def choose_ratio(results: list[dict], max_drop: float, series: str) -> dict:
    """The budgeted ratio of one series. Returns ``ratio`` (the conservative choice; None when even the smallest
    evaluated ratio drops too much, or the series has no pruned ratio) with its ``accuracy``, ``k`` and ``config``;
    ``largest_within`` (the largest ratio within the budget, None if none); ``checked`` (every evaluated ratio of
    the series, ascending, with its accuracy, k and whether it is within)."""
    max_drop = check_max_drop(max_drop)
    base = unpruned_row(results)["accuracy"]
    rows = sorted((r for r in results if r["series"] == series and r["ratio"] > 0), key=lambda r: r["ratio"])
    if not rows:
        known = ", ".join(series_names(results)) or "none"
        raise UsageError(f"no pruned result of series {series!r} (series: {known})")
    ratios = [r["ratio"] for r in rows]
    if len(set(ratios)) != len(ratios):
        raise UsageError(f"series {series!r} has two results at one ratio: {ratios}")
    checked = [{"ratio": r["ratio"], "k": r["k"], "accuracy": r["accuracy"], "within": within(r["accuracy"], base, max_drop)}
               for r in rows]
    chosen = None
    for row, point in zip(rows, checked):
        if not point["within"]:
            break
        chosen = row
    largest = next((point["ratio"] for point in reversed(checked) if point["within"]), None)
    return {
        "series": series, "method": rows[0].get("method"),
        "ratio": chosen["ratio"] if chosen else None,
        "k": chosen["k"] if chosen else None,
        "num_visual_tokens": chosen.get("num_visual_tokens") if chosen else None,
        "accuracy": chosen["accuracy"] if chosen else None,
        "config": chosen.get("config") if chosen else None,
        "largest_within": largest,
        "checked": checked,
    }


def budget_section(results: list[dict], max_drop: float) -> dict:
    """The ``budget`` section of results.json: the budget, the unpruned accuracy, the choice of every series."""
    max_drop = check_max_drop(max_drop)
    base = unpruned_row(results)["accuracy"]
    return {"max_drop": max_drop, "rule": RULE, "unpruned_accuracy": base, "floor": floor(base, max_drop),
            "series": {name: choose_ratio(results, max_drop, name) for name in series_names(results)}}


def held_out_section(calibration: dict, results: list[dict], max_drop: float) -> dict:
    """Ratios chosen on one evaluation (``calibration``: its results.json, with its rows under ``results``), checked
    on another (``results``: rows of the unpruned model and of each series at its chosen ratio). Per series: the
    chosen ratio, its accuracy on both, the drop here and whether the budget ``held`` here (None: nothing chosen)."""
    max_drop = check_max_drop(max_drop)
    chosen = budget_section(calibration["results"], max_drop)
    base = unpruned_row(results)["accuracy"]
    series = {}
    for name, choice in chosen["series"].items():
        here = next((r for r in results if r["series"] == name and r["ratio"] == choice["ratio"]), None)
        series[name] = {
            "ratio": choice["ratio"], "k": choice["k"], "calibration_accuracy": choice["accuracy"],
            "accuracy": here["accuracy"] if here else None,
            "drop_points": 100 * (base - here["accuracy"]) if here else None,
            "held": within(here["accuracy"], base, max_drop) if here else None,
        }
    meta = {key: calibration.get(key) for key in ("dataset", "split", "questions", "subset", "seed", "command")}
    return {"max_drop": max_drop, "rule": RULE, "unpruned_accuracy": base, "floor": floor(base, max_drop),
            "calibration": {**meta, "unpruned_accuracy": chosen["unpruned_accuracy"]}, "series": series}


# ------------------------------------------------------------------------------------------------ rendering


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def summary_lines(section: dict) -> list[str]:
    """One line per series, for the terminal."""
    budget = f"{section['max_drop']:g} point(s)"
    lines = []
    for name, s in section["series"].items():
        if "calibration" in section:
            if s["ratio"] is None:
                lines.append(f"budget {budget}: {name:<24} no ratio within budget on the calibration split")
            else:
                verdict = "held" if s["held"] else "NOT held"
                lines.append(f"budget {budget}: {name:<24} ratio {s['ratio']:g} (chosen on calibration, "
                             f"{_pct(s['calibration_accuracy'])}%) scores {_pct(s['accuracy'])}% here vs unpruned "
                             f"{_pct(section['unpruned_accuracy'])}%: {verdict}")
        elif s["ratio"] is None:
            lines.append(f"budget {budget}: {name:<24} no evaluated ratio within budget (floor {_pct(section['floor'])}%)")
        else:
            extra = (f"; {s['largest_within']:g} is within too, past a ratio that is not"
                     if s["largest_within"] != s["ratio"] else "")
            lines.append(f"budget {budget}: {name:<24} ratio {s['ratio']:g} (k={s['k']}), {_pct(s['accuracy'])}% vs "
                         f"unpruned {_pct(section['unpruned_accuracy'])}%{extra}")
    return lines


def markdown(section: dict) -> str:
    """The section appended to results.md."""
    drop, base = section["max_drop"], _pct(section["unpruned_accuracy"])
    if "calibration" in section:
        cal = section["calibration"]
        lines = [f"## Accuracy budget on held-out data: at most {drop:g} point(s) below unpruned", "",
                 f"Ratios chosen on {cal['dataset']} {cal['split']} ({cal['questions']} questions; unpruned there "
                 f"{_pct(cal['unpruned_accuracy'])}) by the rule: {RULE}. Checked here: unpruned **{base}**, "
                 f"floor {_pct(section['floor'])}. Accuracy in %.", "",
                 "| series | ratio (chosen on calibration) | k | accuracy on calibration | accuracy here | drop here (points) | budget held |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        for name, s in section["series"].items():
            if s["ratio"] is None:
                lines.append(f"| {name} | none within budget | | | | | |")
                continue
            lines.append(f"| {name} | {s['ratio']:g} | {s['k']} | {_pct(s['calibration_accuracy'])} | {_pct(s['accuracy'])} "
                         f"| {s['drop_points']:.2f} | {'yes' if s['held'] else '**no**'} |")
        return "\n".join(lines) + "\n"
    lines = [f"## Accuracy budget: at most {drop:g} point(s) below unpruned ({base})", "",
             f"Per series, {RULE} (floor {_pct(section['floor'])}); 'largest within' differs when a larger ratio passes "
             "after one that fails. ✓ within, ✗ not. Accuracy in %.", "",
             "| series | chosen ratio | kept k/N | accuracy | largest within | ratios checked |", "|---|---:|---:|---:|---:|---|"]
    for name, s in section["series"].items():
        checked = ", ".join(f"{p['ratio']:g}: {_pct(p['accuracy'])} {'✓' if p['within'] else '✗'}" for p in s["checked"])
        largest = "—" if s["largest_within"] is None else f"{s['largest_within']:g}"
        if s["ratio"] is None:
            lines.append(f"| {name} | none | | | {largest} | {checked} |")
        else:
            kept = f"{s['k']}/{s['num_visual_tokens']}" if s.get("num_visual_tokens") else f"{s['k']}"
            lines.append(f"| {name} | {s['ratio']:g} | {kept} | {_pct(s['accuracy'])} | {largest} | {checked} |")
    return "\n".join(lines) + "\n"
