"""The accuracy budget in the CLIs (the rule itself is ``export/budget.py``):

- ``eval_vqa.py --max-drop POINTS``: after the grid, the budgeted ratio of every series, into results.json
  (``budget``), results.md and stderr (:class:`EvalBudget`);
- ``eval_vqa.py --ratios-from RESULTS [--max-drop POINTS]``: calibrate on one evaluation, report on another — the
  grid is the unpruned model plus each series of RESULTS at the ratio chosen there, and the report says whether
  the budget held on this data;
- ``build.py --ratio-from RESULTS [--max-drop POINTS] [--method M | --series S]``: build the chosen configuration
  (:func:`choose_for_build`).

Every check (flags, the results file, the model's weights) runs before any evaluation or export.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from export.budget import (budget_section, check_max_drop, choose_ratio, held_out_section, markdown, series_names,
                           summary_lines)
from runtime.errors import UsageError
from runtime.files import parse_json, write_atomically

MAX_DROP_HELP = ("accuracy budget in points (1.0 = one point = 0.01 of the accuracy): per series, the chosen ratio is "
                 "the largest evaluated ratio r such that EVERY evaluated ratio <= r of the series scores at least the "
                 "unpruned accuracy minus POINTS (conservative: a ratio past one that fails is not chosen; the largest "
                 "ratio within is recorded too when it differs)")
# flags that make the grid: --ratios-from replaces it, so they cannot be combined with it
GRID_FLAGS = {"ratios": "--ratios", "methods": "--methods", "layer_weights": "--layer-weights",
              "positions": "--positions", "image_importance": "--image-importance",
              "trim_first_layer": "--trim-first-layer"}
# pruning settings of a results row that a build takes over (a row lacking one leaves the build's flag alone)
ROW_SETTINGS = {"layer_weights": "--layer-weights", "positions": "--positions", "image_importance": "--image-importance",
                "seed": "--seed", "trim_first_layer": "--trim-first-layer"}
ROW_KEYS = {"series": str, "ratio": (int, float), "k": int, "accuracy": (int, float)}


def read_results(path: Path, flag: str) -> dict:
    """An evaluation's results.json (or the folder holding it), checked enough for the budget: one-line errors."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file (expected the results.json an eval_vqa.py run writes)")
    data = parse_json(path.read_text(encoding="utf-8", errors="replace"), str(path), UsageError)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise UsageError(f"{flag} {path}: not an eval_vqa.py results.json (no 'results' list)")
    for number, row in enumerate(data["results"]):
        bad = [key for key, kind in ROW_KEYS.items() if not isinstance(row, dict) or not isinstance(row.get(key), kind)
               or isinstance(row.get(key), bool)]
        if bad:
            raise UsageError(f"{flag} {path}: result {number} lacks a valid {', '.join(bad)}")
    data["path"] = str(path)
    return data


def budget_of(data: dict, max_drop: float | None, flag: str) -> float:
    """``--max-drop`` when given, else the budget the results were evaluated with."""
    if max_drop is None:
        max_drop = (data.get("budget") or {}).get("max_drop")
        if max_drop is None:
            raise UsageError(f"{flag} {data['path']}: it has no budget section (evaluated without --max-drop): pass --max-drop")
    return check_max_drop(max_drop)


# ------------------------------------------------------------------------------------------------ eval_vqa.py


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                        help=MAX_DROP_HELP + ". Needs 0 among --ratios. Written to results.json ('budget'), results.md, stderr")
    parser.add_argument("--ratios-from", type=Path, default=None, metavar="RESULTS",
                        help="calibrate on one run, report on this one: RESULTS is the results.json of a run on another "
                             "split (e.g. --split train --limit 500); this run evaluates unpruned + each series at the "
                             "ratio chosen there and reports whether the budget held here. Replaces the grid flags; "
                             "the budget is RESULTS' --max-drop unless --max-drop is given")


def config_from_row(row: dict, where: str):
    """The grid point a results row was evaluated with; it must give back the row's own name and series."""
    from export.eval_pipelines import Config

    config = Config(**{f.name: row[f.name] for f in fields(Config) if row.get(f.name) is not None})
    if config.name != row.get("config") or config.series != row["series"]:
        raise UsageError(f"--ratios-from {where}: cannot rebuild configuration {row.get('config')!r} from its row "
                         "(written by another version of eval_vqa.py?)")
    return config


class EvalBudget:
    """``--max-drop`` / ``--ratios-from`` of one evaluation: checked by :meth:`plan` before any work (which may
    replace the grid), applied by :meth:`finish` after it."""

    def __init__(self, max_drop: float | None, configs: list, calibration: dict | None = None):
        self.max_drop, self.configs, self.calibration = max_drop, configs, calibration

    @classmethod
    def plan(cls, args: argparse.Namespace, configs: list, defaults: argparse.Namespace) -> EvalBudget:
        """``configs``: the grid the flags make; ``defaults``: the flags' defaults (to tell the grid flags given)."""
        max_drop = None if args.max_drop is None else check_max_drop(args.max_drop)
        if args.ratios_from is None:
            if max_drop is not None and not any(config.unpruned for config in configs):
                raise UsageError("--max-drop needs 0 among --ratios: the budget is measured from the unpruned accuracy")
            return cls(max_drop, configs)
        given = [flag for dest, flag in GRID_FLAGS.items() if getattr(args, dest, None) != getattr(defaults, dest, None)]
        if given:
            raise UsageError(f"--ratios-from sets the grid (unpruned + each series at the ratio chosen in RESULTS): "
                             f"leave out {', '.join(given)}")
        data = read_results(args.ratios_from, "--ratios-from")
        max_drop = budget_of(data, max_drop, "--ratios-from")
        section = budget_section(data["results"], max_drop)  # no unpruned row: one line here
        unpruned = next((config for config in configs if config.unpruned), None)
        if unpruned is None:
            raise UsageError("--ratios-from needs the unpruned configuration in the grid")
        chosen = [next(r for r in data["results"] if r["series"] == name and r["ratio"] == s["ratio"])
                  for name, s in section["series"].items() if s["ratio"] is not None]
        if not chosen:
            raise UsageError(f"--ratios-from {data['path']}: no series has a ratio within {max_drop:g} point(s) of "
                             "unpruned there: nothing to check")
        return cls(max_drop, [unpruned, *(config_from_row(row, data["path"]) for row in chosen)], data)

    def check_weights(self, weights: dict, model: Path) -> None:
        """Ratios chosen on other weights say nothing about this model."""
        if self.calibration is not None and self.calibration.get("weights_sha256") != weights:
            raise UsageError(f"--ratios-from {self.calibration['path']} was evaluated on other weights than {model} "
                             "(weights_sha256 differs): its ratios were chosen for another model")

    def finish(self, out: Path) -> None:
        """The budget section into ``out``/results.json and results.md (already written by the run); a line per
        series on stderr."""
        if self.max_drop is None and self.calibration is None:
            return
        data = json.loads((out / "results.json").read_text())
        if self.calibration is None:
            section = budget_section(data["results"], self.max_drop)
        else:
            section = held_out_section(self.calibration, data["results"], self.max_drop)
            section["calibration"]["results"] = self.calibration["path"]
            section["calibration"]["same_split"] = (self.calibration.get("dataset"), self.calibration.get("split")) == (
                data.get("dataset"), data.get("split"))
        data["budget"] = section
        write_atomically(out / "results.json", json.dumps(data, indent=2) + "\n")
        text = markdown(section)
        if section.get("calibration", {}).get("same_split"):
            text += "\nNote: calibrated on the same split as reported here: this is not a held-out check.\n"
        with open(out / "results.md", "a", encoding="utf-8") as handle:
            handle.write("\n" + text)
        for line in summary_lines(section):
            print(line, file=sys.stderr)


# ------------------------------------------------------------------------------------------------ build.py


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def choose_for_build(args: argparse.Namespace, defaults: argparse.Namespace, say) -> None:
    """``build.py --ratio-from``: set ``args`` (ratio, method and the series' pruning settings) to the configuration
    chosen in the results for the budget, after checking the results were computed on this model's weights.
    The series: ``--series`` if given, else the one named ``--method`` (the method with uniform layer weights and
    original positions), else the model family's default method."""
    from export import adapters
    from export.adapters.base import weights_sha256
    from export.defaults import resolve_model

    data = read_results(args.ratio_from, "--ratio-from")
    path, rows = data["path"], data["results"]
    max_drop = budget_of(data, args.max_drop, "--ratio-from")
    model = resolve_model(args.model)
    adapter_cls = adapters.detect(model)
    if data.get("weights_sha256") != weights_sha256(model):
        if not args.allow_other_weights:
            raise UsageError(f"--ratio-from {path} was evaluated on other weights than {model} (weights_sha256 differs): "
                             "its accuracies say nothing about this model (--allow-other-weights to use it anyway)")
        say(f"warning: {path} was evaluated on other weights than {model}; used anyway (--allow-other-weights)")
    name = args.series or args.method or adapter_cls.default_method
    if name not in series_names(rows):
        raise UsageError(f"--ratio-from {path} has no series {name!r} (series: {', '.join(series_names(rows)) or 'none'}); "
                         "pick one with --series")
    choice = choose_ratio(rows, max_drop, name)
    base = next(r for r in rows if r["ratio"] == 0)["accuracy"]
    if choice["ratio"] is None:
        first = choice["checked"][0]
        raise UsageError(f"--ratio-from {path}: no evaluated ratio of series {name!r} stays within {max_drop:g} point(s) "
                         f"of unpruned ({_pct(base)}); the smallest, {first['ratio']:g}, scores {_pct(first['accuracy'])}")
    row = next(r for r in rows if r["series"] == name and r["ratio"] == choice["ratio"])
    if args.method is not None and args.method != row["method"]:
        raise UsageError(f"--method {args.method} but series {name!r} of {path} is method {row['method']}")
    for dest, flag in ROW_SETTINGS.items():
        value = row.get(dest)
        if value is None or not hasattr(args, dest):
            continue  # not recorded (e.g. seed of a non-random method): the build's flag stands
        given = getattr(args, dest)
        if given != getattr(defaults, dest) and given != value:
            raise UsageError(f"{flag} {given} differs from series {name!r} of {path} ({value}): leave it out, "
                             "--ratio-from builds the evaluated configuration")
        setattr(args, dest, value)
    args.ratio, args.method = choice["ratio"], row["method"]

    floor = base - max_drop / 100
    after = [p for p in choice["checked"] if p["ratio"] > choice["ratio"]]
    why = (f"the next evaluated ratio, {after[0]['ratio']:g}, scores {_pct(after[0]['accuracy'])}, below {_pct(floor)}"
           if after else "it is the largest ratio evaluated")
    if choice["largest_within"] != choice["ratio"]:
        why += f" ({choice['largest_within']:g} is within again, but past a ratio that is not: not chosen)"
    say(f"--ratio-from {path}: series {name!r} -> ratio {choice['ratio']:g} (k={choice['k']}): {_pct(choice['accuracy'])} "
        f"on {data.get('dataset')} {data.get('split')} ({data.get('questions')} questions) vs unpruned {_pct(base)}; "
        f"it and every smaller evaluated ratio stay within {max_drop:g} point(s) (>= {_pct(floor)}); {why}")
