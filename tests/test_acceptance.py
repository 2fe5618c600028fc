"""Issue 2's acceptance, through the CLIs, on tiny BLIP-2 checkpoints no other test uses.

build.py --model DIR --ratio R --method catp --layer-weights uniform --no-image-importance --positions compact
then infer.py --json: kept-index sets equal an independent implementation of the voting, and the answer equals
HF generation (unpruned: Blip2ForConditionalGeneration.generate; pruned: the LM's generate on the kept queries).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from export.pruning import keep_count
from export.tiny import TinyBlip2Spec, make_tiny_blip2
from independent import catp_kept_sets, hf_answer_ids

UNSEEN = {
    "freq2": TinyBlip2Spec(image_size=48, patch_size=12, vision_layers=3, vision_heads=3, vision_hidden=24, num_queries=12,
                           qformer_layers=3, qformer_heads=2, qformer_hidden=24, cross_attention_frequency=2,
                           lm_layers=3, lm_heads=2, lm_hidden=16, seed=11),
    "freq1": TinyBlip2Spec(image_size=40, patch_size=10, vision_layers=2, vision_heads=2, vision_hidden=16, num_queries=10,
                           qformer_layers=2, qformer_heads=4, qformer_hidden=16, cross_attention_frequency=1,
                           lm_layers=2, lm_heads=8, lm_hidden=32, seed=23),
}
QUESTIONS = ["what color is the shape?", "how many shapes are there?"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    paths = []
    for index, size in enumerate([(50, 70), (64, 40)]):
        path = folder / f"sample{index}.png"
        Image.fromarray(rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", list(UNSEEN))
@pytest.mark.parametrize("ratio", [pytest.param(0.0, marks=pytest.mark.slow), pytest.param(0.33, marks=pytest.mark.slow), 0.5,
                                   pytest.param(0.75, marks=pytest.mark.slow)])
def test_unseen_checkpoint_matches_independent_voting_and_hf(name, ratio, samples, tmp_path):
    model_dir = make_tiny_blip2(tmp_path / name, UNSEEN[name])
    out = tmp_path / "engines"
    run_cli("export/build.py", "--model", model_dir, "--ratio", ratio, "--method", "catp", "--layer-weights", "uniform",
            "--no-image-importance", "--positions", "compact", "--out", out, "--quiet", check=True)
    pairs = [arg for path, q in zip(samples, QUESTIONS) for arg in ("--image", path, "--question", q)]
    result = run_cli("runtime/infer.py", "--engines", out, *pairs, "--json", "--max-new-tokens", 6, check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2

    k = keep_count(UNSEEN[name].num_queries, ratio)
    for record, image_path, question in zip(records, samples, QUESTIONS):
        assert {"answer", "kept_indices", "timings_ms"} <= set(record)
        assert set(record["timings_ms"]) >= {"preprocess", "visual", "prefill", "decode", "total"}
        image = Image.open(image_path)
        expected_kept, _ = catp_kept_sets(model_dir, image, k)
        assert set(record["kept_indices"]) == expected_kept
        assert record["kept_indices"] == sorted(record["kept_indices"])
        prompt = f"Question: {question} Answer:"
        expected_ids = hf_answer_ids(model_dir, image, prompt, None if ratio == 0 else sorted(expected_kept), 6)
        assert record["token_ids"] == expected_ids
