"""How much one visual token matters: accuracy by answer type, split by whether a configuration kept the token.

    python scripts/kept_token_effect.py scripts/results/easy-vqa-ort-cpu --token 0
    python scripts/kept_token_effect.py scripts/results/easy-vqa-ort-cpu --token 0 --positions original --json out.json

Reads an eval_vqa.py --out folder (predictions.jsonl); every pruned configuration's questions are split into those
whose kept_indices contain --token and those whose do not. Nothing is re-run.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from runtime.errors import UsageError, cli_errors


def split_by_token(predictions: Path, token: int, positions: str | None, configs: dict[str, dict]) -> dict:
    """{config: {"kept"|"dropped": {answer_type: [sum of scores, count]}}}"""
    table: dict[str, dict] = defaultdict(lambda: {"kept": defaultdict(lambda: [0.0, 0]), "dropped": defaultdict(lambda: [0.0, 0])})
    with predictions.open() as lines:
        for line in lines:
            record = json.loads(line)
            config = configs.get(record["config"])
            if config is None or config["method"] == "unpruned":
                continue
            if positions and config["positions"] != positions:
                continue
            side = "kept" if token in record["kept_indices"] else "dropped"
            cell = table[record["config"]][side][record.get("answer_type", "all")]
            cell[0] += record["score"]
            cell[1] += 1
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="eval_vqa.py --out folder")
    parser.add_argument("--token", type=int, required=True, help="visual token index")
    parser.add_argument("--positions", choices=("original", "compact"), help="only configurations with this policy")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    results_path, predictions_path = args.run / "results.json", args.run / "predictions.jsonl"
    if not results_path.is_file() or not predictions_path.is_file():
        raise UsageError(f"{args.run}: no results.json and predictions.jsonl (an eval_vqa.py --out folder?)")
    configs = {r["config"]: r for r in json.loads(results_path.read_text())["results"]}
    table = split_by_token(predictions_path, args.token, args.positions, configs)
    if not table:
        raise UsageError(f"{args.run}: no pruned configuration to split")
    kinds = sorted({kind for sides in table.values() for side in sides.values() for kind in side})
    print(f"accuracy (%) [questions] with token {args.token} kept | dropped")
    print(f"{'configuration':28s} " + " ".join(f"{kind:>26s}" for kind in kinds))
    summary = {}
    for name in (c for c in configs if c in table):
        cells, row = [], {}
        for kind in kinds:
            parts = []
            for side in ("kept", "dropped"):
                total, count = table[name][side].get(kind, (0.0, 0))
                row.setdefault(side, {})[kind] = {"accuracy": total / count if count else None, "questions": count}
                parts.append(f"{100 * total / count:5.1f} [{count:4d}]" if count else "    - [   0]")
            cells.append(" | ".join(parts))
        summary[name] = row
        print(f"{name:28s} " + " ".join(f"{cell:>26s}" for cell in cells))
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "token": args.token, "configs": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    with cli_errors("kept_token_effect.py"):
        sys.exit(main())
