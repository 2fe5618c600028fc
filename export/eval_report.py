"""The evaluation's outputs, rewritten after every configuration so that a stopped run keeps what it measured:
``results.json`` (the run's settings and one row per configuration, with accuracy per answer type),
``predictions.jsonl`` (one line per question and configuration), ``results.md`` (accuracy table: rows are ratios,
columns the method variants), ``accuracy_vs_ratio.png`` (accuracy against the kept fraction, log2 axis) and, for a
model with a cross-attention cache (Mllama), ``accuracy_vs_kept_kv.png`` (accuracy against the cross-attention
keys/values kept per image).

matplotlib is imported by :func:`plot` only, with the ``Agg`` backend (no display needed).
"""
from __future__ import annotations

import json
from pathlib import Path


def accuracy_by_type(records: list[dict]) -> dict[str, dict]:
    """Accuracy per answer type (easy-VQA: yes/no, color, shape; VQAv2: yes/no, number, other)."""
    scores: dict[str, list[float]] = {}
    for record in records:
        scores.setdefault(record["answer_type"], []).append(record["score"])
    return {kind: {"accuracy": sum(values) / len(values), "questions": len(values)}
            for kind, values in sorted(scores.items())}


def write_outputs(out: Path, meta: dict, results: list[dict], predictions: dict[str, list[dict]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w") as handle:
        for name, records in predictions.items():
            for record in records:
                handle.write(json.dumps({"config": name, **record}) + "\n")
    (out / "results.md").write_text(markdown_table(meta, results))
    plot(out / "accuracy_vs_ratio.png", meta, results)
    if any(r.get("cross_kv_bytes") for r in results):
        plot_kv(out / "accuracy_vs_kept_kv.png", meta, results)


def _kept(result: dict) -> str:
    return f"{result['k']}/{result['num_visual_tokens']} ({result['kept_fraction']:.4g})"


def markdown_table(meta: dict, results: list[dict]) -> str:
    """Rows: ratio / kept fraction; columns: method variants; cells: accuracy in %."""
    unpruned = next((r for r in results if r["config"] == "unpruned"), None)
    pruned = [r for r in results if r["config"] != "unpruned"]
    series = list(dict.fromkeys(r["series"] for r in pruned))
    cells = {(r["series"], r["ratio"]): r for r in pruned}
    metric = "exact match after VQA normalisation" if meta["metric"] == "exact_match" else "official VQA accuracy"
    lines = [
        f"# Accuracy vs pruning ratio: {Path(meta['model']).name} on {meta['dataset']} {meta['split']}",
        "",
        f"{meta['questions']} questions" + (f" (random subset, seed {meta['seed']})" if meta["subset"] else "")
        + f", {metric}, backend `{meta['backend']}`, max {meta['max_new_tokens']} new tokens. Accuracy in %.",
        "",
    ]
    if unpruned:
        lines += [f"Unpruned: **{100 * unpruned['accuracy']:.2f}** (all {unpruned['num_visual_tokens']} visual tokens).", ""]
    lines.append("| ratio | kept k/N | " + " | ".join(series or ["unpruned"]) + " |")
    lines.append("|---|---|" + "---:|" * max(1, len(series)))
    if unpruned:
        lines.append(f"| 0 (unpruned) | {_kept(unpruned)} | " + " | ".join([f"{100 * unpruned['accuracy']:.2f}"] * max(1, len(series))) + " |")
    for ratio in sorted({r["ratio"] for r in pruned}):
        row = [cells.get((s, ratio)) for s in series]
        any_result = next(r for r in row if r is not None)
        values = [f"{100 * r['accuracy']:.2f}" if r is not None else "" for r in row]
        lines.append(f"| {ratio:g} | {_kept(any_result)} | " + " | ".join(values) + " |")
    kinds = sorted({kind for r in results for kind in r.get("accuracy_by_type", {})})
    kv = all(r.get("cross_kv_bytes") for r in results)
    if kinds:
        lines += ["", "By answer type (questions: " + ", ".join(
            f"{kind} {results[0]['accuracy_by_type'].get(kind, {}).get('questions', 0)}" for kind in kinds) + "):", "",
            "| configuration | k/N | all | " + " | ".join(kinds) + " |" + (" cross-attn KV / image |" if kv else ""),
            "|---|---|---:|" + "---:|" * (len(kinds) + kv)]
        for r in results:
            by_type = r.get("accuracy_by_type", {})
            values = [f"{100 * by_type[kind]['accuracy']:.2f}" if kind in by_type else "" for kind in kinds]
            if kv:
                values.append(f"{r['cross_kv_bytes'] / 1024:.1f} KiB ({100 * r['cross_kv_kept_fraction']:.1f}%)")
            lines.append(f"| {r['config']} | {r['k']}/{r['num_visual_tokens']} | {100 * r['accuracy']:.2f} | "
                         + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, meta: dict, results: list[dict]) -> None:
    """Accuracy against kept fraction (log2 axis): a line per method variant, unpruned as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    draw_series(axes, results, lambda r: r["kept_fraction"], 1.0)
    ticks = sorted({(r["kept_fraction"], f"{r['k']}/{r['num_visual_tokens']}") for r in results})
    if ticks:
        axes.set_xscale("log", base=2)
        axes.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
        axes.minorticks_off()
    axes.set_xlabel("kept visual tokens k/N (log scale)")
    finish(path, figure, axes, meta)


def plot_kv(path: Path, meta: dict, results: list[dict]) -> None:
    """Accuracy against the fraction of the cross-attention keys/values kept per image (Mllama): a line per method
    variant; trimming the first layer too moves a variant's points left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    draw_series(axes, [r for r in results if r.get("cross_kv_bytes")], lambda r: 100 * r["cross_kv_kept_fraction"], 100.0)
    full = next(r["cross_kv_bytes_full"] for r in results if r.get("cross_kv_bytes_full"))
    axes.set_xlabel(f"cross-attention keys/values kept per image (% of {full / 1024:.0f} KiB)")
    finish(path, figure, axes, meta)


def draw_series(axes, results: list[dict], x_of, unpruned_x: float) -> None:
    """Accuracy (%) against ``x_of(row)``: a line per method variant, unpruned as a dashed line and a dot at
    ``unpruned_x``."""
    pruned = [r for r in results if r["config"] != "unpruned"]
    markers = "osD^vPX*<>"
    for number, series in enumerate(dict.fromkeys(r["series"] for r in pruned)):
        points = sorted((x_of(r), 100 * r["accuracy"]) for r in pruned if r["series"] == series)
        # distinct markers, shrinking, so that lines lying on top of each other stay visible
        axes.plot([x for x, _ in points], [y for _, y in points], marker=markers[number % len(markers)],
                  markersize=max(3.0, 9.0 - 1.2 * number), linewidth=1.5, alpha=0.85, label=series)
    unpruned = next((r for r in results if r["config"] == "unpruned"), None)
    if unpruned:
        axes.axhline(100 * unpruned["accuracy"], color="black", linestyle="--", linewidth=1,
                     label=f"unpruned ({100 * unpruned['accuracy']:.1f})")
        axes.plot([unpruned_x], [100 * unpruned["accuracy"]], marker="o", color="black", markersize=5)


def finish(path: Path, figure, axes, meta: dict) -> None:
    """What both plots share: the accuracy axis, the title (model, data, questions, backend), grid, legend, file."""
    import matplotlib.pyplot as plt

    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{Path(meta['model']).name} on {meta['dataset']} {meta['split']} "
                   f"({meta['questions']} questions, {meta['backend']})", fontsize=10)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
