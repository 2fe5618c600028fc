"""The PyTorch reference's graph calls saved in Polygraphy's JSON formats — written and read with numpy + json only
(Polygraphy is not a runtime dependency), so that a machine without torch (TensorRT, CUDA) can judge its engines
against them: ``python -m runtime.parity --engines E --reference-outputs REF.json --backend ...``.

Files (``--save-reference REF.json``):

- ``REF.json`` — the outputs, a Polygraphy ``RunResults`` (``polygraphy.comparator.RunResults.load``): one runner
  entry per reference, ``torch-fp32`` and, when parity ran with the float64 calibration, ``torch-float64``; each
  holds one ``IterationResult`` per graph call, in the order the reference pipeline made them, its tensors keyed by
  the graph's output names (fp32 floats; float64 in ``torch-float64``; integers as the graphs return them);
  ``torch-score-bounds`` for rank-count methods (CATP, trim-union): per call, ``scores.lower`` / ``scores.upper``
  (B, N) — the scores reachable when near-tied attention probabilities rank either way — on the calls that select
  tokens, nothing on the others (the bounds need the model, so a replay without torch reads them from here).
- ``REF.inputs.json`` — the feeds of those calls, as ``polygraphy run --save-inputs`` writes them
  (``polygraphy.json.load_json``: a list of feed dicts, input name → array). Feeds are the reference's own: fp32
  floats whatever the graphs' precision (a replay casts them to the dtypes the manifest declares).

How calls map to graphs: iteration ``i`` of every runner entry and feed dict ``i`` are one call. Its graph is the
engines' graph whose input names are the feed dict's keys and whose output names are the iteration's keys (the
pipelines' graphs differ in their inputs: visual/vision take pixels, embed ids, prefill the prompt, decode one token
and the cache); saving refuses engines two of whose graphs share both, and a replay refuses a call no graph of its
engines matches.

Encoding (``polygraphy/json/serde.py`` and ``comparator/struct.py``): an object of a Polygraphy class is a JSON
object tagged ``"polygraphy_class": <class name>``. An array is ``{"array": base64 of np.save(array,
allow_pickle=False) bytes, "polygraphy_class": "ndarray"}``; an ``IterationResult`` is ``{"outputs": {name:
LazyArray}, "runtime": seconds or null, "runner_name": ...}`` with a ``LazyArray`` ``{"values": array}``; a
``RunResults`` is ``{"lst": [[runner name, [IterationResult, ...]], ...]}``.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import UsageError
from runtime.files import parse_json, writing_atomically

FP32_RUNNER, FLOAT64_RUNNER, BOUNDS_RUNNER = "torch-fp32", "torch-float64", "torch-score-bounds"
LOWER, UPPER = "scores.lower", "scores.upper"  # a selection call's rank-count score bounds (BOUNDS_RUNNER)
TYPE_MARKER = "polygraphy_class"
INDENT = 4  # as Polygraphy writes them


def inputs_path(outputs_path: str | Path) -> Path:
    """Where the inputs of ``REF.json`` go: ``REF.inputs.json`` beside it."""
    outputs_path = Path(outputs_path)
    return outputs_path.with_name(f"{outputs_path.stem}.inputs{outputs_path.suffix}")


# ------------------------------------------------------------------------------------------------- graphs


def graph_signatures(manifest) -> dict[tuple[frozenset, frozenset], str]:
    """(input names, output names) → graph, for every graph of the manifest; graphs that share both are refused
    (their calls could not be told apart in the saved files)."""
    signatures: dict[tuple[frozenset, frozenset], str] = {}
    for name, spec in manifest.graphs.items():
        key = (frozenset(t.name for t in spec.inputs), frozenset(t.name for t in spec.outputs))
        if key in signatures:
            raise UsageError(f"graphs {signatures[key]!r} and {name!r} have the same inputs and outputs: their saved "
                             "calls could not be told apart")
        signatures[key] = name
    return signatures


def graph_of(signatures: dict[tuple[frozenset, frozenset], str], feeds: dict, outputs: dict, index: int) -> str:
    """The graph of saved call ``index``: the one with exactly its input and output names."""
    key = (frozenset(feeds), frozenset(outputs))
    if key not in signatures:
        raise UsageError(f"saved call {index} (inputs {', '.join(sorted(feeds))}) matches no graph of these engines: "
                         "the reference was saved from other engines")
    return signatures[key]


# ------------------------------------------------------------------------------------------------- writing


def check_save_path(path: str | Path, manifest) -> Path:
    """``--save-reference``'s path, checked before anything runs: a ``.json`` file (Polygraphy reads a path without
    an extension as a folder of per-iteration files) in an existing folder, for engines whose graphs the saved
    calls can name."""
    path = Path(path)
    if path.suffix != ".json":
        raise UsageError(f"--save-reference {path}: give a .json file name (Polygraphy reads a path without an "
                         "extension as a folder of per-iteration files)")
    for target in (path, inputs_path(path)):
        if target.is_dir():
            raise UsageError(f"--save-reference: {target} is a folder; give the file name")
    if not path.parent.is_dir():
        raise UsageError(f"--save-reference {path}: the folder {path.parent} does not exist")
    graph_signatures(manifest)
    return path


def encode_array(array: np.ndarray) -> dict[str, str]:
    """Polygraphy's encoding of a numpy array: the ``np.save`` bytes (no pickles), base64."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode("ascii"), TYPE_MARKER: "ndarray"}


def _encode(value: Any) -> Any:
    """``json.dump``'s hook: arrays are encoded as they are written, one at a time."""
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return encode_array(np.asarray(value))
    raise TypeError(f"cannot save a {type(value).__name__} in a Polygraphy JSON file")


def run_results_document(runs: dict[str, list[tuple[dict[str, np.ndarray], float | None]]]) -> dict[str, Any]:
    """A ``RunResults`` object: ``runs`` maps a runner name to its iterations, each (outputs, seconds or None)."""
    return {
        "lst": [
            [runner, [{"outputs": {name: {"values": array, TYPE_MARKER: "LazyArray"} for name, array in outputs.items()},
                       "runtime": None if seconds is None else float(seconds),
                       "runner_name": runner,
                       TYPE_MARKER: "IterationResult"}
                      for outputs, seconds in iterations]]
            for runner, iterations in runs.items()
        ],
        TYPE_MARKER: "RunResults",
    }


def write_json(path: Path, document: Any) -> None:
    """``document`` as Polygraphy's JSON, streamed into ``path`` (atomically: never a half-written file)."""
    try:
        with writing_atomically(path) as stream:
            json.dump(document, stream, indent=INDENT, default=_encode)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


def save_reference(path: Path, calls, float64: list[dict[str, np.ndarray]] | None,
                   bounds: list[dict[str, np.ndarray]] | None = None) -> tuple[Path, Path]:
    """Write the reference's graph ``calls`` (each with ``feeds``, ``outputs``, ``seconds``) and, when given, the
    float64 outputs and the score bounds of the same calls: the outputs to ``path``, the inputs beside it. Returns
    both paths."""
    runs = {FP32_RUNNER: [(call.outputs, call.seconds) for call in calls]}
    if float64 is not None:
        runs[FLOAT64_RUNNER] = [(outputs, None) for outputs in float64]
    if bounds is not None:
        runs[BOUNDS_RUNNER] = [(call_bounds, None) for call_bounds in bounds]
    write_json(path, run_results_document(runs))
    write_json(inputs_path(path), [call.feeds for call in calls])
    return path, inputs_path(path)


# ------------------------------------------------------------------------------------------------- reading


def decode_array(value: Any, where: str) -> np.ndarray:
    """An array from Polygraphy's encoding (a ``LazyArray`` around it included); anything else is one line."""
    if isinstance(value, dict) and value.get(TYPE_MARKER) == "LazyArray":
        value = value.get("values")
    if not isinstance(value, dict) or value.get(TYPE_MARKER) != "ndarray" or not isinstance(value.get("array"), str):
        raise UsageError(f"{where}: not an array in Polygraphy's encoding")
    try:
        return np.load(io.BytesIO(base64.b64decode(value["array"].encode("ascii"), validate=True)), allow_pickle=False)
    except (ValueError, EOFError, OSError, binascii.Error, UnicodeEncodeError) as err:
        raise UsageError(f"{where}: the array cannot be decoded ({err})") from None


def read_json(path: Path, flag: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    return parse_json(text, str(path), UsageError)


def load_run_results(path: Path, flag: str = "--reference-outputs") -> dict[str, list[dict[str, np.ndarray]]]:
    """runner name → its iterations' outputs (name → array), from a ``RunResults`` JSON file."""
    document = read_json(path, flag)
    if not isinstance(document, dict) or document.get(TYPE_MARKER) != "RunResults" or not isinstance(document.get("lst"), list):
        raise UsageError(f"{flag} {path}: not a Polygraphy RunResults file")
    runs: dict[str, list[dict[str, np.ndarray]]] = {}
    for entry in document["lst"]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)):
            raise UsageError(f"{flag} {path}: a runner entry is not [name, [iteration results]]")
        runner, iterations = entry
        runs[runner] = []
        for index, iteration in enumerate(iterations):
            outputs = iteration.get("outputs") if isinstance(iteration, dict) else None
            if not isinstance(outputs, dict):
                raise UsageError(f"{flag} {path}: iteration {index} of {runner!r} has no outputs")
            runs[runner].append({name: decode_array(value, f"{path}: {runner} iteration {index} output {name!r}")
                                 for name, value in outputs.items()})
    return runs


def load_feeds(path: Path, flag: str = "--reference-inputs") -> list[dict[str, np.ndarray]]:
    """The feed dicts of a ``--save-inputs`` JSON file."""
    document = read_json(path, flag)
    if not isinstance(document, list) or not all(isinstance(feeds, dict) for feeds in document):
        raise UsageError(f"{flag} {path}: not a list of feed dicts (polygraphy run --save-inputs)")
    return [{name: decode_array(value, f"{path}: feed dict {index} input {name!r}") for name, value in feeds.items()}
            for index, feeds in enumerate(document)]


@dataclass
class SavedReference:
    """What ``--save-reference`` wrote: per call, the feeds, the fp32 outputs and (if saved) the float64 outputs."""

    outputs_path: Path
    inputs_path: Path
    feeds: list[dict[str, np.ndarray]]
    fp32: list[dict[str, np.ndarray]]
    float64: list[dict[str, np.ndarray]] | None
    bounds: list[dict[str, np.ndarray]] | None = None  # per call: LOWER/UPPER on selection calls, else empty


def load_saved_reference(outputs_path: str | Path, saved_inputs: str | Path | None = None) -> SavedReference:
    """The saved reference of ``--reference-outputs`` (inputs from ``--reference-inputs``, default beside it)."""
    outputs_path = Path(outputs_path)
    feeds_path = Path(saved_inputs) if saved_inputs is not None else inputs_path(outputs_path)
    runs = load_run_results(outputs_path)
    if FP32_RUNNER not in runs:
        raise UsageError(f"--reference-outputs {outputs_path}: no {FP32_RUNNER!r} runner (found: {', '.join(runs) or 'none'})")
    feeds = load_feeds(feeds_path)
    counts = {name: len(iterations) for name, iterations in runs.items() if name in (FP32_RUNNER, FLOAT64_RUNNER, BOUNDS_RUNNER)}
    if any(count != len(feeds) for count in counts.values()):
        raise UsageError(f"{feeds_path} holds {len(feeds)} feed dict(s) but {outputs_path} "
                         + ", ".join(f"{count} {name} iteration(s)" for name, count in counts.items()))
    return SavedReference(outputs_path, feeds_path, feeds, runs[FP32_RUNNER], runs.get(FLOAT64_RUNNER), runs.get(BOUNDS_RUNNER))
