"""Parity: run the exported graphs and the PyTorch reference on the same inputs and compare every stage.

    python -m runtime.parity --engines engines/X          # writes engines/X/parity.json, exit 1 on failure
    python -m runtime.parity --engines engines/X --save-reference ref.json
                                                          # + the reference's graph calls (Polygraphy JSON)
    python -m runtime.parity --engines engines/X --reference-outputs ref.json --backend ort-cuda
                                                          # torch-free: the saved calls replayed and judged

(``python runtime/parity ...`` runs the same CLI.) Stages: ``preprocess`` and ``tokenize`` (the runtime vs HF's
processor), the graphs (scores, kept-index sets with near-tie analysis, embeddings, logits and caches — each graph fed
the reference's own inputs), ``generation`` (the whole ONNX pipeline's greedy tokens vs the reference pipeline's) and
``hf_anchor`` (the reference's tokens vs HF ``generate`` where HF can express the configuration). With ``--num-beams
N`` both decode by beam search, and the anchor is HF ``generate(num_beams=N)``.

The reference is the HF model with the same pruning module (``export/``). Float tensors are judged against the
reference's own rounding noise: the reference runs each graph a second time in float64 on the same inputs, and a
tensor passes when its error against float64 is within a few times what fp32 PyTorch itself makes
(``runtime/tolerance.py``; a tensor-scale-relative fallback where a float64 copy of the model does not fit).

What lives where:

    compare.py      the comparisons, pure numpy: tensors (via runtime/tolerance.py), kept sets, rank bounds, tokens
    stages.py       the shared skeleton: inputs, recording runners, ParityContext, the family registry, run_parity
    blip2.py        BLIP-2's stages          (@register_stages("blip2-opt"))
    mllama.py       LLaMA-3.2-Vision's stages (@register_stages("mllama"))
    report.py       the report file and the per-stage summary lines
    run_results.py  the reference's graph calls in Polygraphy's JSON formats (--save-reference), numpy + json only
    replay.py       torch-free parity against those files (--reference-outputs)
    __main__.py     the CLI (argparse, then the functions above)

The runtime never imports torch: everything torch — loading the reference, its float64 runs, HF's generate for the
anchors — is ``export/reference.py``, imported once, lazily, by ``run_parity``, which hands the reference object down.
"""
from __future__ import annotations

from runtime.parity import blip2, mllama  # noqa: F401  (each registers its family's stages)
from runtime.parity.compare import worst_exceedance
from runtime.parity.replay import replay_parity
from runtime.parity.stages import DEFAULT_QUESTIONS, TOLERANCES, default_images, run_parity

__all__ = ["DEFAULT_QUESTIONS", "TOLERANCES", "blip2", "default_images", "mllama", "replay_parity", "run_parity",
           "worst_exceedance"]
