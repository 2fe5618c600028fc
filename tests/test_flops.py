"""export/flops.py: hand-computed FLOPs on made-up configs, which stages pruning changes, and parameter counts that
match real checkpoints (the per-layer shapes behind the FLOPs are the checkpoints' shapes)."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from export.flops import StageCost, num_visual_tokens, parameter_count, speedup, stage_costs
from runtime.errors import CheckpointError, UsageError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "blip2-easyvqa"

# BLIP-2: ViT hidden 4 / ffn 8 / 1 layer / 1 head, 4 px images of 2 px patches → P = 2² + 1 = 5 tokens;
# Q-Former hidden 4 / ffn 8 / 1 layer (a cross layer) / 1 head, Q = 4 queries; OPT hidden 8 / ffn 16 / 1 layer /
# 2 heads / vocabulary 10
BLIP2 = {
    "model_type": "blip-2", "num_query_tokens": 4,
    "vision_config": {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                      "image_size": 4, "patch_size": 2},
    "qformer_config": {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                       "cross_attention_frequency": 1, "encoder_hidden_size": 4},
    "text_config": {"hidden_size": 8, "ffn_dim": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
                    "word_embed_proj_dim": 8, "max_position_embeddings": 16},
}
# Mllama: ViT hidden 4 / ffn 8 / 1 local + 1 global layer / 1 head, 2 tiles of 4 px, patch 2 → 4 patches + CLS = 5
# tokens per tile (N = 10), padded to 8 per tile in the ViT (16); text hidden 8 / ffn 16 / 3 layers, layers 1 and 2
# cross-attention, 2 heads of 4, 1 key/value head, vocabulary 10
MLLAMA = {
    "model_type": "mllama",
    "vision_config": {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_global_layers": 1,
                      "attention_heads": 1, "image_size": 4, "patch_size": 2, "max_num_tiles": 2, "vision_output_dim": 8,
                      "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
    "text_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "vocab_size": 10, "cross_attention_layers": [1, 2]},
}


def flops(costs: dict[str, StageCost]) -> dict[str, float]:
    return {key: cost.flops for key, cost in costs.items()}


def test_blip2_hand_computed():
    got = flops(stage_costs(BLIP2, kept=2, text_len=3, batch=1, new_tokens=3))
    # ViT: patch conv as a linear 2·(P−1)·(3·2²)·4; a layer's linears qkv 4→12, out 4→4, fc1 4→8, fc2 8→4 = 128
    # weights over P rows; attention Q·Kᵀ + P·V = 2·2·P·P·4
    assert got["visual.vision_encoder"] == 2 * 4 * 12 * 4 + 2 * 5 * 128 + 4 * 5 * 5 * 4
    # Q-Former: self q,k,v,o (4·16) + MLP (2·32) over Q = 4 rows; self attention 4·Q·Q·4; cross q,o over Q (2·16),
    # k,v over the P image tokens (2·16); cross attention 4·Q·P·4
    assert got["visual.qformer"] == 2 * 4 * 128 + 4 * 4 * 4 * 4 + 2 * 4 * 32 + 2 * 5 * 32 + 4 * 4 * 5 * 4
    # CATP, 1 cross layer × 1 head × P image tokens: Q² comparisons + Q² counted, Q votes summed
    assert got["visual.scoring"] == 5 * (2 * 4 * 4 + 4)
    assert got["visual.projection"] == 2 * 2 * 4 * 8  # only the k = 2 kept queries, 4 → 8
    # OPT prefill over S = k + T = 5: q,k,v,o 4·8·8 + fc1, fc2 2·8·16 per token; attention 2·2·S²·8 (all S×S
    # scores); LM head 2·8·10 on the last position only
    assert got["prefill"] == 2 * 5 * (4 * 8 * 8 + 2 * 8 * 16) + 2 * 2 * 5 * 5 * 8 + 2 * 8 * 10
    # 2 decode steps, each over the preallocated cache of C = S + new_tokens − 1 = 7 slots plus its own key
    assert got["decode"] == 2 * (2 * (4 * 8 * 8 + 2 * 8 * 16) + 2 * 2 * (7 + 1) * 8 + 2 * 8 * 10)
    assert got["visual"] == sum(got[f"visual.{s}"] for s in ("vision_encoder", "qformer", "scoring", "projection"))
    assert set(got) == {"visual", "visual.vision_encoder", "visual.qformer", "visual.scoring", "visual.projection",
                        "prefill", "decode"}


def test_blip2_bytes_count_the_kv_cache_each_step():
    """One kept query more: every decode step reads 2·L·D more cache elements and writes H more probabilities."""
    steps, db = 4, 2
    small, large = (stage_costs(BLIP2, kept=k, text_len=3, batch=1, new_tokens=steps + 1, dtype_bytes=db) for k in (2, 3))
    assert large["decode"].bytes - small["decode"].bytes == steps * (2 * 1 * 8 + 2) * db
    # projection: gathered (k, 4), weights 4·8 + 8, output (k, 8)
    assert small["visual.projection"].bytes == (2 * 4 + 4 * 8 + 8 + 2 * 8) * db
    assert stage_costs(BLIP2, kept=2, text_len=3, batch=1, new_tokens=5, dtype_bytes=4)["decode"].bytes == 2 * small["decode"].bytes


def test_mllama_hand_computed():
    got = flops(stage_costs(MLLAMA, kept=4, text_len=3, batch=1, new_tokens=2))
    # text linears: q, o 8→8; k, v 8→4; gate, up 8→16; down 16→8
    qo, kv, mlp = 2 * 8 * 8, 2 * 8 * 4, 3 * 8 * 16
    # ViT: patch conv 2·(2 tiles·4 patches)·12·4; 2 layers over Sv = 16 (q,k,v,o 4·16 + fc1, fc2 2·32 = 128 weights)
    assert got["visual.vision_encoder"] == 2 * 8 * 12 * 4 + 2 * (2 * 16 * 128 + 2 * 2 * 16 * 16 * 4)
    assert got["visual.projection"] == 2 * 10 * 8 * 8  # N = 10 tokens, 8 → 8
    # 1 self layer over T = 3 (attention 2·2·H·T·T·Dh) + the LM head on the last position
    assert got["prefill.text_prefill"] == 2 * 3 * (qo + kv + mlp) + 2 * 2 * 2 * 3 * 3 * 4 + 2 * 8 * 10
    # first cross layer: K/V of all N = 10, q/o/MLP over T, attention over N
    assert got["prefill.first_cross_attention"] == 2 * 10 * kv + 2 * 3 * (qo + mlp) + 2 * 2 * 2 * 3 * 10 * 4
    # scoring pass: q again, Q·Kᵀ over N, trim-sum (row weights × probs, summed) 2·H·T·N
    assert got["prefill.scoring"] == 2 * 3 * 8 * 8 + 2 * 2 * 3 * 10 * 4 + 2 * 2 * 3 * 10
    assert got["prefill.cross_kv_build"] == 2 * 4 * kv  # 1 later cross layer, K/V of the k = 4 kept
    assert got["prefill.cross_attention_prefill"] == 2 * 3 * (qo + mlp) + 2 * 2 * 2 * 3 * 4 * 4
    # 1 decode step, cache C = T + 1 = 4 slots + its own key; cross layers read N (first) and k keys
    assert got["decode.text_decode"] == 2 * (qo + kv + mlp) + 2 * 2 * 2 * (4 + 1) * 4 + 2 * 8 * 10
    assert got["decode.cross_attention_decode"] == 2 * 2 * (qo + mlp) + 2 * 2 * 2 * (10 + 4) * 4
    trimmed = flops(stage_costs(MLLAMA, kept=4, text_len=3, batch=1, new_tokens=2, trim_first_layer=True))
    assert trimmed["prefill.first_cross_attention"] == got["prefill.first_cross_attention"] - 2 * 2 * 2 * 3 * (10 - 4) * 4
    assert trimmed["decode.cross_attention_decode"] == 2 * (2 * (qo + mlp) + 2 * 2 * 2 * 4 * 4)
    for stage in ("visual", "prefill", "decode"):
        assert got[stage] == sum(v for key, v in got.items() if key.startswith(stage + "."))


def ratio_kept(n: int, ratio: float) -> int:
    return max(1, round(n * (1 - ratio)))


def test_blip2_pruning_changes_only_the_language_side():
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    full, pruned = (stage_costs(config, kept=ratio_kept(32, r), text_len=6, batch=2, new_tokens=5) for r in (0, 0.75))
    for key in ("visual.vision_encoder", "visual.qformer", "visual.scoring"):
        assert full[key] == pruned[key]
    for key in ("visual.projection", "prefill", "decode"):
        assert pruned[key].flops < full[key].flops and pruned[key].bytes < full[key].bytes
    assert speedup(full, pruned)["visual.projection"] == 4.0  # 32 → 8 rows


@pytest.mark.parametrize("trim", [False, True])
def test_mllama_pruning_changes_only_what_sees_kept_tokens(trim):
    costs = {k: stage_costs(MLLAMA, kept=k, text_len=5, batch=3, new_tokens=4, trim_first_layer=trim) for k in (2, 5, 10)}
    for key in ("visual", "prefill.text_prefill", "decode.text_decode"):
        assert costs[2][key] == costs[10][key]
    assert costs[2]["prefill.scoring"].flops == costs[10]["prefill.scoring"].flops  # scored over all N
    assert costs[5]["prefill.cross_kv_build"].flops == 2.5 * costs[2]["prefill.cross_kv_build"].flops  # ∝ k
    for key in ("prefill.cross_attention_prefill", "decode.cross_attention_decode"):
        assert costs[2][key].flops < costs[5][key].flops < costs[10][key].flops
    first = [costs[k]["prefill.first_cross_attention"].flops for k in (2, 5, 10)]
    assert (first[0] < first[1] < first[2]) if trim else (first[0] == first[2])  # attends k, or all N


@pytest.mark.parametrize("config", [BLIP2, MLLAMA])
def test_ratio_zero_is_no_speedup_anywhere(config):
    n = num_visual_tokens(config)
    full = stage_costs(config, kept=n, text_len=4, batch=2, new_tokens=3)
    same = stage_costs(config, kept=ratio_kept(n, 0), text_len=4, batch=2, new_tokens=3)
    assert set(speedup(full, same).values()) == {1.0}
    one = stage_costs(config, kept=n, text_len=4, batch=1, new_tokens=1)  # no decode step: 0 / 0
    assert one["decode"] == StageCost(0.0, 0.0) and speedup(one, one)["decode"] == 1.0
    assert "total" in speedup(full, same)


def test_parameter_count_matches_real_checkpoints():
    # BLIP-2 OPT-2.7b's shapes: HF Blip2ForConditionalGeneration built on torch.device("meta") with this config
    # has 3,744,679,936 parameters (lm_head tied to the embeddings)
    opt27 = {
        "model_type": "blip-2", "num_query_tokens": 32,
        "vision_config": {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                          "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
        "qformer_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "cross_attention_frequency": 2, "encoder_hidden_size": 1408},
        "text_config": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "vocab_size": 50272},
    }
    assert abs(parameter_count(opt27) / 3.745e9 - 1) < 0.02
    # the shipped default model: its safetensors header (shapes only; the tied lm_head is not stored)
    raw = (DEFAULT_MODEL / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    stored = sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    assert parameter_count(json.loads((DEFAULT_MODEL / "config.json").read_text())) == stored
    # Llama-3.2-11B-Vision's shapes (HF MllamaConfig() defaults, 448 px tiles): 10,642,941,475 on the meta device
    mllama11b = {
        "model_type": "mllama",
        "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_global_layers": 8,
                          "attention_heads": 16, "image_size": 448, "patch_size": 14, "max_num_tiles": 4,
                          "vision_output_dim": 7680, "supported_aspect_ratios": [[1, 1]] * 8},
        "text_config": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 40,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                        "cross_attention_layers": list(range(3, 40, 5))},
    }
    assert parameter_count(mllama11b) == 10_642_941_475
    assert num_visual_tokens({**mllama11b, "vision_config": {**mllama11b["vision_config"], "image_size": 560}}) == 6404


def test_bad_inputs_are_typed_errors():
    with pytest.raises(CheckpointError, match="model_type"):
        stage_costs({"model_type": "llava"}, kept=1, text_len=1, batch=1, new_tokens=1)
    with pytest.raises(CheckpointError, match="text_config.ffn_dim"):
        stage_costs({**BLIP2, "text_config": {"hidden_size": 8}}, kept=1, text_len=1, batch=1, new_tokens=1)
    with pytest.raises(UsageError, match="kept"):
        stage_costs(BLIP2, kept=5, text_len=1, batch=1, new_tokens=1)
    with pytest.raises(UsageError, match="trim_first_layer"):
        stage_costs(BLIP2, kept=2, text_len=1, batch=1, new_tokens=1, trim_first_layer=True)
