"""The evaluation on Mllama checkpoints: the family's grid (its methods, ratio 0 through its cheapest graph, the
first-layer trim as an axis) and the cross-attention keys/values kept per image, counted from the manifest."""
from __future__ import annotations

import importlib

import pytest


@pytest.fixture(scope="module")
def eval_vqa():
    return importlib.import_module("export.evaluate")  # what scripts/eval_vqa.py runs


def test_mllama_grid_and_cross_kv_bytes(eval_vqa):
    """Mllama: its own methods by default, ratio 0 through its cheapest graph, the first-layer trim as an axis; the
    cross-attention keys/values kept per image counted from the manifest."""
    from types import SimpleNamespace

    from export.adapters.blip2 import Blip2OptAdapter as Blip2Adapter
    from export.adapters.mllama import MllamaAdapter
    from export.eval_pipelines import cross_kv_bytes
    from runtime.errors import UsageError

    args = eval_vqa.parse_args(["--ratios", "0,0.75", "--trim-first-layer", "off,on"])
    grid = eval_vqa.make_grid(args, MllamaAdapter)
    assert grid[0].name == "unpruned" and grid[0].method == "uniform"
    assert [c.name for c in grid[1:]] == [f"{m}{t}-r0.75" for m in ("trim-sum", "trim-union", "l2", "random-s0", "uniform")
                                          for t in ("", "-trim1")]
    assert {c.series for c in grid if c.trim_first_layer} == {f"{m} +first layer" for m in ("trim-sum", "trim-union", "l2", "random", "uniform")}
    assert all(c.pruning().trim_first_layer == c.trim_first_layer for c in grid)
    with pytest.raises(UsageError, match="unknown --method 'catp'"):
        eval_vqa.make_grid(eval_vqa.parse_args(["--methods", "catp"]), MllamaAdapter)
    with pytest.raises(UsageError, match="Mllama"):
        eval_vqa.make_grid(eval_vqa.parse_args(["--trim-first-layer", "on"]), Blip2Adapter)
    with pytest.raises(UsageError, match="off, on"):
        eval_vqa.make_grid(eval_vqa.parse_args(["--trim-first-layer", "yes"]))
    assert eval_vqa.make_grid(eval_vqa.parse_args(["--ratios", "0"]), Blip2Adapter)[0].method == "first-k"

    # 3 cross layers, 2 KV heads of 32, N = 260, k = 65, fp32: 2 (K, V) * 2 * 32 * 4 bytes = 512 bytes a token
    language = {"cross_attention_layers": [1, 3, 5], "num_key_value_heads": 2, "head_dim": 32}
    for trim, kept_tokens in ((False, 260 + 65 + 65), (True, 3 * 65)):
        manifest = SimpleNamespace(language_model=language, precision="fp32",
                                   pruning=SimpleNamespace(num_visual_tokens=260, k=65, trim_first_layer=trim))
        assert cross_kv_bytes(manifest) == {"full": 512 * 3 * 260, "kept": 512 * kept_tokens,
                                            "kept_fraction": round(kept_tokens / 780, 6)}
    assert cross_kv_bytes(SimpleNamespace(language_model={"num_layers": 2}, precision="fp32", pruning=None)) is None

