"""The repository's default locations, in one place: the shipped model, the engines folder, evaluation outputs.

``export/build.py`` and the evaluation (``export/evaluate.py``) default to the same model and resolve it the same
way (:func:`resolve_model`); the runtime needs none of this (its one input is an engines folder), so it lives in
``export/``. Paths are relative to the repository: the package is installed editable (``pip install -e``), so
``REPO`` is the checkout the model, ``engines/`` and ``scripts/results/`` sit in.
"""
from __future__ import annotations

from pathlib import Path

from runtime.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
ENGINES = REPO / "engines"
DEFAULT_MODEL = REPO / "models" / "blip2-easyvqa"
DEFAULT_MODEL_NOTE = ("models/blip2-easyvqa, a small BLIP-2 trained on easy-VQA that ships with the repository; "
                      "'mllama' names models/mllama-easyvqa, the shipped LLaMA-3.2-Vision-style model")
MLLAMA_MODEL = REPO / "models" / "mllama-easyvqa"
# the shipped models by name: ``--model blip2`` / ``--model mllama`` (a folder of that name, if any, wins)
MODEL_ALIASES = {"blip2": (DEFAULT_MODEL, "scripts/train_easyvqa.py"), "mllama": (MLLAMA_MODEL, "scripts/train_easyvqa_mllama.py")}
# CATP's layer weights when none are asked for: the first Q-Former cross-attention layer alone. The paper's own
# per-layer study (papers.md: BLIP-2 OPT-2.7B, VQAv2) has layer 1 best at every keep ratio (44.17 / 35.44 / 30.17
# at keep 1/2, 1/4, 1/8 against 22–43 / 11–35 / 10–24 for the others), and first-only beat every geometric
# weighting they tried (31.37 at keep 1/8); their code's last variant used the first layer only.
DEFAULT_LAYER_WEIGHTS = "first"
EVAL_ENGINES_CACHE = ENGINES / "_eval"  # engines built by the evaluation, one folder per configuration
EVAL_RESULTS = REPO / "scripts" / "results"  # the evaluation's default --out is a folder under here


def resolve_model(model: Path | None) -> Path:
    """``--model`` when given (a folder, or the name of a shipped model: ``blip2``, ``mllama``), else the shipped
    BLIP-2 default (which must be there)."""
    if model is not None and (model.exists() or str(model) not in MODEL_ALIASES):
        return model
    folder, trainer = MODEL_ALIASES[str(model) if model is not None else "blip2"]
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"the shipped model {folder} is missing: pass --model DIR (a local BLIP-2 OPT or Mllama "
                              f"checkpoint), or train it with {trainer}")
    return folder
