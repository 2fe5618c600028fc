"""Answer-level parity between two eval_vqa.py runs (e.g. ``--backend torch`` against ``--backend ort-cpu``).

    python scripts/compare_evals.py scripts/results/agree-torch scripts/results/agree-ort-cpu \
        --out scripts/results/agreement-torch-vs-ort-cpu.json

Both runs must cover the same configurations and questions (same --ratios/--methods/--limit/--seed). For every
configuration it counts the questions whose answers (and kept-index lists) are equal, and lists every
disagreement. Exit 0 when every answer agrees, 1 otherwise, 2 when the runs are not comparable.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from runtime.errors import UsageError, cli_errors


def load_run(folder: Path) -> tuple[dict, dict[str, dict[int, dict]]]:
    results_path, predictions_path = folder / "results.json", folder / "predictions.jsonl"
    for path in (results_path, predictions_path):
        if not path.is_file():
            raise UsageError(f"{path} not found: point at an eval_vqa.py --out folder")
    summary = json.loads(results_path.read_text())
    by_config: dict[str, dict[int, dict]] = defaultdict(dict)
    with predictions_path.open() as lines:
        for line in lines:
            record = json.loads(line)
            by_config[record["config"]][record["question_id"]] = record
    return summary, by_config


def compare(run_a: dict[str, dict[int, dict]], run_b: dict[str, dict[int, dict]]) -> list[dict]:
    if set(run_a) != set(run_b):
        raise UsageError(f"the runs cover different configurations: {sorted(set(run_a) ^ set(run_b))}")
    rows = []
    for config in sorted(run_a):
        answers_a, answers_b = run_a[config], run_b[config]
        if set(answers_a) != set(answers_b):
            raise UsageError(f"{config}: the runs cover different questions (same --limit and --seed?)")
        answer_mismatches = [
            {"question_id": qid, "question": answers_a[qid]["question"],
             "a": answers_a[qid]["prediction"], "b": answers_b[qid]["prediction"]}
            for qid in sorted(answers_a) if answers_a[qid]["prediction"] != answers_b[qid]["prediction"]
        ]
        kept_mismatches = sum(
            answers_a[qid].get("kept_indices") != answers_b[qid].get("kept_indices") for qid in answers_a
        )
        rows.append({
            "config": config,
            "questions": len(answers_a),
            "answers_equal": len(answers_a) - len(answer_mismatches),
            "kept_indices_equal": len(answers_a) - kept_mismatches,
            "answer_mismatches": answer_mismatches,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a", type=Path, help="eval_vqa.py --out folder")
    parser.add_argument("run_b", type=Path, help="eval_vqa.py --out folder")
    parser.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args(argv)

    summary_a, run_a = load_run(args.run_a)
    summary_b, run_b = load_run(args.run_b)
    if summary_a.get("weights_sha256") != summary_b.get("weights_sha256"):
        raise UsageError("the runs evaluated different model weights (weights_sha256 differs)")
    rows = compare(run_a, run_b)

    total = sum(row["questions"] for row in rows)
    equal = sum(row["answers_equal"] for row in rows)
    kept_equal = sum(row["kept_indices_equal"] for row in rows)
    for row in rows:
        print(f"{row['config']:28s} answers {row['answers_equal']}/{row['questions']}  "
              f"kept sets {row['kept_indices_equal']}/{row['questions']}")
    print(f"all: answers equal {equal}/{total}, kept indices equal {kept_equal}/{total} "
          f"({summary_a.get('backend')} vs {summary_b.get('backend')})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "run_a": {"folder": str(args.run_a), "backend": summary_a.get("backend"), "command": summary_a.get("command")},
            "run_b": {"folder": str(args.run_b), "backend": summary_b.get("backend"), "command": summary_b.get("command")},
            "weights_sha256": summary_a.get("weights_sha256"),
            "questions": total, "answers_equal": equal, "kept_indices_equal": kept_equal,
            "configs": rows,
        }, indent=2) + "\n")
    return 0 if equal == total else 1


if __name__ == "__main__":
    with cli_errors("compare_evals.py"):
        sys.exit(main())
