"""A FLOP and byte model of each pipeline stage, from a checkpoint's ``config.json`` (pure Python, no torch).

``stage_costs`` returns the runtime's stages (``visual``, ``prefill``, ``decode``: the names ``clock.lap`` times)
and sub-stages that timing cannot split but the graphs compute separately (``visual.qformer``,
``prefill.cross_kv_build`` …; a stage equals the sum of its sub-stages). It counts what the exported graphs compute
(``export/models/*.py``, ``export/adapters/*.py``), including their static-shape choices: the prefill's logits are
the last position's only; a decode step attends the whole preallocated cache of ``C = prompt + new_tokens − 1``
slots (the graph scores empty slots too, then masks them); Mllama's prefill runs the first cross-attention layer's
``q`` projection and ``QKᵀ`` over all ``N`` tokens twice, once to score (charged to ``scoring``) and once to attend.
Simplifications: FLOPs are matmuls only (a multiply-add = 2) plus the scoring's comparisons (one pair compared = 1,
its count = 1); LayerNorm/RMSNorm, softmax, activations, residuals, RoPE and top-k selection count 0 FLOPs.
Bytes are a lower bound in one ``dtype_bytes`` for everything (score math: 4): every weight a graph call uses read
once (decode: once per step; an embedding table only the rows gathered), its graph inputs and KV caches read once,
and each main tensor written once (linear outputs, attention probabilities and contexts, gathers, ranks); no other
traffic. BLIP-2 scoring is CATP with every cross-attention layer weighted (``uniform``), Mllama's is ``trim-sum``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from runtime.errors import CheckpointError, UsageError

Config = dict[str, Any]
Linear = tuple[int, int, bool]  # (d_in, d_out, has bias)


@dataclass(frozen=True)
class StageCost:
    flops: float = 0.0  # multiply-adds count as 2 FLOPs
    bytes: float = 0.0  # weights read + activations / KV cache read and written (lower bound: each tensor once)

    def __add__(self, other: StageCost) -> StageCost:
        return StageCost(self.flops + other.flops, self.bytes + other.bytes)

    def __radd__(self, other: Any) -> StageCost:  # sum() starts from 0
        return self if isinstance(other, int) and other == 0 else NotImplemented

    def __rmul__(self, times: float) -> StageCost:  # n identical layers or steps: n * cost
        return StageCost(self.flops * times, self.bytes * times)


# ------------------------------------------------------------------------------------------------ building blocks


def _params(linears: list[Linear]) -> int:  # weights d_in·d_out (+ bias d_out) each
    return sum(d_in * d_out + (d_out if bias else 0) for d_in, d_out, bias in linears)


def _dense(rows: int, linears: list[Linear], db: int, weights: bool = True) -> StageCost:
    """Each linear over (rows, d_in) → (rows, d_out): 2·rows·d_in·d_out FLOPs; its weights read, its output written."""
    flops = sum(2 * rows * d_in * d_out for d_in, d_out, _ in linears)
    written = sum(rows * d_out for _, d_out, _ in linears)
    return StageCost(flops, db * (written + (_params(linears) if weights else 0)))


def _attention(batch: int, heads: int, queries: int, keys: int, head_dim: int, db: int, context: bool = True) -> StageCost:
    """Q·Kᵀ (B,H,S,Dh)·(B,H,Dh,L) → probs (B,H,S,L): 2·B·H·S·L·Dh; probs·V → (B,H,S,Dh): the same again. GQA repeats
    the key/value heads, so H is the query heads. Probs and context (B,S,H·Dh) written."""
    probs = batch * heads * queries * keys
    flops = 2 * probs * head_dim * (2 if context else 1)
    return StageCost(flops, db * (probs + (batch * queries * heads * head_dim if context else 0)))


def _io(elements: int, db: int) -> StageCost:
    """Bytes only: graph inputs, caches and table rows read, gathers written, norm weights."""
    return StageCost(0.0, float(elements * db))


def _read(config: Config, where: str, **keys: str) -> dict[str, Any]:
    """{name: config[where][key]} (``where`` "" = the top level); a missing key is one CheckpointError naming it."""
    section = config.get(where, {}) if where else config
    missing = [f"{where}.{key}".lstrip(".") for key in keys.values() if key not in section]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    return {name: section[key] for name, key in keys.items()}


def _check(kept: int, num_tokens: int, text_len: int, batch: int, new_tokens: int) -> None:
    if not 1 <= kept <= num_tokens:
        raise UsageError(f"kept must lie in [1, {num_tokens}], got {kept}")
    if min(text_len, batch, new_tokens) < 1:
        raise UsageError(f"text_len, batch and new_tokens must be ≥ 1, got {text_len}, {batch}, {new_tokens}")


def _stages(**stages: dict[str, StageCost]) -> dict[str, StageCost]:
    """{stage: {sub: cost}} → {stage: sum, "stage.sub": cost} (a lone part is the stage itself, no sub-key)."""
    out: dict[str, StageCost] = {}
    for stage, parts in stages.items():
        out[stage] = sum(parts.values(), StageCost())
        if len(parts) > 1:
            out.update({f"{stage}.{sub}": cost for sub, cost in parts.items()})
    return out


def _vit_layer(dim: int, ffn: int, qkv_bias: bool, fused_qkv: bool) -> list[Linear]:
    """A ViT layer's linears: q,k,v (fused in BLIP-2, with bias; separate in Mllama, no bias), out, fc1, fc2."""
    qkv = [(dim, 3 * dim, qkv_bias)] if fused_qkv else [(dim, dim, False)] * 3
    return [*qkv, (dim, dim, fused_qkv), (dim, ffn, True), (ffn, dim, True)]


# ------------------------------------------------------------------------------------------------ BLIP-2 (OPT)


def _blip2_dims(config: Config) -> dict[str, Any]:
    v, q, t = (config.get(key, {}) for key in ("vision_config", "qformer_config", "text_config"))
    d = _read(config, "vision_config", Dv="hidden_size", Fv="intermediate_size", Lv="num_hidden_layers",
              Hv="num_attention_heads", image="image_size", patch="patch_size")
    d |= _read(config, "qformer_config", Dq="hidden_size", Fq="intermediate_size", Lq="num_hidden_layers",
               Hq="num_attention_heads", De="encoder_hidden_size")
    d |= _read(config, "text_config", D="hidden_size", F="ffn_dim", L="num_hidden_layers", H="num_attention_heads",
               V="vocab_size") | _read(config, "", Q="num_query_tokens")
    d.update(P=(d["image"] // d["patch"]) ** 2 + 1,  # image tokens + CLS
             freq=q.get("cross_attention_frequency", 2), qkv_bias=v.get("qkv_bias", True), bias=t.get("enable_bias", True),
             E=t.get("word_embed_proj_dim") or d["D"], positions=t.get("max_position_embeddings", 2048) + 2,  # OPT offset 2
             tied=t.get("tie_word_embeddings", True))
    d["cross"] = [layer for layer in range(d["Lq"]) if layer % d["freq"] == 0]
    return d


def _blip2_parts(d: dict[str, Any]) -> dict[str, list[Linear]]:
    Dq, D, E, b = d["Dq"], d["D"], d["E"], d["bias"]
    return {"vit": _vit_layer(d["Dv"], d["Fv"], d["qkv_bias"], fused_qkv=True), "qf_self": [(Dq, Dq, True)] * 4,
            "qf_mlp": [(Dq, d["Fq"], True), (d["Fq"], Dq, True)], "qf_cross_q": [(Dq, Dq, True)] * 2,  # q and out
            "qf_cross_kv": [(d["De"], Dq, True)] * 2, "projection": [(Dq, D, True)],
            "opt": [(D, D, b)] * 4 + [(D, d["F"], b), (d["F"], D, b)],  # q, k, v, out, fc1, fc2
            "project_in": [(E, D, False)] if E != D else [], "project_out": [(D, E, False)] if E != D else []}


def blip2_parameters(config: Config) -> int:
    d = _blip2_dims(config)
    p = _blip2_parts(d)
    Dv, Dq, D = d["Dv"], d["Dq"], d["D"]
    vision = 3 * d["patch"] ** 2 * Dv + Dv + Dv + d["P"] * Dv + d["Lv"] * (_params(p["vit"]) + 4 * Dv) + 2 * Dv
    qformer = d["Q"] * Dq + 2 * Dq + d["Lq"] * (_params(p["qf_self"] + p["qf_mlp"]) + 4 * Dq)
    qformer += len(d["cross"]) * (_params(p["qf_cross_q"] + p["qf_cross_kv"]) + 2 * Dq)
    text = d["V"] * d["E"] * (1 if d["tied"] else 2) + d["positions"] * D + d["L"] * (_params(p["opt"]) + 4 * D) + 2 * D
    return vision + qformer + _params(p["projection"]) + text + _params(p["project_in"] + p["project_out"])


def _opt_pass(d: dict[str, Any], p: dict[str, list[Linear]], batch: int, new: int, cached: int, db: int) -> StageCost:
    """OPT over (B,new,E) attending `cached` slots + the new tokens (past K/V read); logits of the last position."""
    D, H = d["D"], d["H"]
    cost = _io(batch * new * (d["E"] + D), db) + _dense(batch * new, p["project_in"], db)  # input + position rows
    layer = _dense(batch * new, p["opt"], db) + _attention(batch, H, new, cached + new, D // H, db) + _io(4 * D, db)
    layer += _io(2 * batch * cached * D, db)  # past K and V read
    return cost + d["L"] * layer + _io(2 * D, db) + _dense(batch, p["project_out"] + [(d["E"], d["V"], False)], db)


def _blip2_costs(config: Config, k: int, T: int, B: int, new_tokens: int, db: int, trim_first_layer: bool) -> dict[str, StageCost]:
    if trim_first_layer:
        raise UsageError("trim_first_layer is a Trimmed-Llama (Mllama) option; BLIP-2 has no cross-attention cache")
    d = _blip2_dims(config)
    p = _blip2_parts(d)
    Dv, Hv, P, Q, Dq, Hq = d["Dv"], d["Hv"], d["P"], d["Q"], d["Dq"], d["Hq"]
    _check(k, Q, T, B, new_tokens)
    vision = _io(B * 3 * d["image"] ** 2, db) + _dense(B * (P - 1), [(3 * d["patch"] ** 2, Dv, True)], db)  # patch conv
    vision += _io(B * P * Dv + (P + 1) * Dv, db)  # + CLS and position embeddings: (B,P,Dv) written, tables read
    vision += d["Lv"] * (_dense(B * P, p["vit"], db) + _attention(B, Hv, P, P, Dv // Hv, db) + _io(4 * Dv, db))
    vision += _io(2 * Dv, db)  # post LayerNorm
    qformer = _io(Q * Dq + 2 * Dq, db)  # query tokens + input LayerNorm
    qformer += d["Lq"] * (_dense(B * Q, p["qf_self"] + p["qf_mlp"], db) + _attention(B, Hq, Q, Q, Dq // Hq, db) + _io(4 * Dq, db))
    cross = _dense(B * Q, p["qf_cross_q"], db) + _dense(B * P, p["qf_cross_kv"], db)  # keys/values from (B,P,De)
    qformer += len(d["cross"]) * (cross + _attention(B, Hq, Q, P, Dq // Hq, db) + _io(2 * Dq, db))
    # CATP per cross layer: for every (b, head, image token) rank the Q queries by counting, Q² pairs compared and
    # Q² counted (2·Q² ops), then Q votes summed; ranks (B,Hq,Q,P) written in fp32
    scoring = len(d["cross"]) * StageCost(B * Hq * P * (2 * Q * Q + Q), 4.0 * B * Hq * Q * P)
    projection = _io(B * k * Dq, db) + _dense(B * k, p["projection"], db)  # kept (B,k,Dq) gathered → (B,k,D)
    prompt = k + T
    prefill = _io(2 * B * T * d["E"], db) + _opt_pass(d, p, B, prompt, 0, db)  # embed graph: rows read, (B,T,E) written
    step = _io(2 * B * d["E"], db) + _opt_pass(d, p, B, 1, prompt + new_tokens - 1, db)  # token embedding, cache C
    return _stages(visual={"vision_encoder": vision, "qformer": qformer, "scoring": scoring, "projection": projection},
                   prefill={"prefill": prefill}, decode={"decode": (new_tokens - 1) * step})


# ------------------------------------------------------------------------------------------------ Mllama


def _mllama_dims(config: Config) -> dict[str, Any]:
    v, t = config.get("vision_config", {}), config.get("text_config", {})
    d = _read(config, "vision_config", Dv="hidden_size", Fv="intermediate_size", Lv="num_hidden_layers", Lg="num_global_layers",
              Hv="attention_heads", image="image_size", patch="patch_size", tiles="max_num_tiles", out="vision_output_dim")
    d |= _read(config, "text_config", D="hidden_size", F="intermediate_size", L="num_hidden_layers", H="num_attention_heads",
               V="vocab_size", cross="cross_attention_layers")
    patches = (d["image"] // d["patch"]) ** 2
    d.update(KV=t.get("num_key_value_heads", d["H"]), Dh=d["D"] // d["H"], patches=patches, t=patches + 1,
             ratios=len(v.get("supported_aspect_ratios", [None] * 8)), tied=t.get("tie_word_embeddings", False))
    d.update(Sv=d["tiles"] * (d["t"] + (8 - d["t"] % 8) % 8), N=d["tiles"] * d["t"])  # padded to 8 per tile in the ViT
    return d


def _mllama_parts(d: dict[str, Any]) -> dict[str, list[Linear]]:
    D, HD, KVD, F = d["D"], d["H"] * d["Dh"], d["KV"] * d["Dh"], d["F"]
    return {"vit": _vit_layer(d["Dv"], d["Fv"], False, fused_qkv=False), "projector": [(d["out"], D, True)],
            "q": [(D, HD, False)], "qo": [(D, HD, False), (HD, D, False)], "kv": [(D, KVD, False)] * 2,
            "mlp": [(D, F, False)] * 2 + [(F, D, False)]}  # gate, up, down


def mllama_parameters(config: Config) -> int:
    d = _mllama_dims(config)
    p = _mllama_parts(d)
    Dv, D, Dh, tables = d["Dv"], d["D"], d["Dh"], d["ratios"] + 1  # aspect-ratio id 0 = padding
    vision = 3 * d["patch"] ** 2 * Dv + Dv + 1 + d["t"] * Dv + tables * d["tiles"] * d["t"] * Dv  # gated pos. emb.
    vision += 2 * (tables * d["tiles"] * Dv + 1) + 4 * Dv + (d["Lv"] + d["Lg"]) * (_params(p["vit"]) + 4 * Dv) + 2 * d["Lg"]
    self_layer = _params(p["qo"] + p["kv"] + p["mlp"]) + 2 * D
    cross_layer = self_layer + 2 * Dh + 2  # + q_norm, k_norm, two gates
    text = (d["V"] + 8) * D + (d["L"] - len(d["cross"])) * self_layer + len(d["cross"]) * cross_layer + D
    return vision + _params(p["projector"]) + text + (0 if d["tied"] else d["V"] * D)


def _mllama_costs(config: Config, k: int, T: int, B: int, new_tokens: int, db: int, trim_first_layer: bool) -> dict[str, StageCost]:
    d = _mllama_dims(config)
    p = _mllama_parts(d)
    Dv, Hv, Sv, N, D, H, KV, Dh = d["Dv"], d["Hv"], d["Sv"], d["N"], d["D"], d["H"], d["KV"], d["Dh"]
    _check(k, N, T, B, new_tokens)
    lm_head = _io(D, db) + _dense(B, [(D, d["V"], False)], db)  # final RMSNorm + logits (B,V) of the last position
    vision = _io(B * d["tiles"] * 3 * d["image"] ** 2, db)  # pixel_values (B,1,tiles,3,H,W) read
    vision += _dense(B * d["tiles"] * d["patches"], [(3 * d["patch"] ** 2, Dv, False)], db)  # patch conv
    vision += _io(B * d["tiles"] * d["t"] * Dv * 2 + d["t"] * Dv + 2 * B * d["tiles"] * Dv, db)  # embeddings + rows
    vision += (d["Lv"] + d["Lg"]) * (_dense(B * Sv, p["vit"], db) + _attention(B, Hv, Sv, Sv, Dv // Hv, db) + _io(4 * Dv, db))
    vision += _io(4 * Dv + B * N * d["out"], db)  # LayerNorms pre/post; local+intermediate features (B,N,out) written
    projection = _dense(B * N, p["projector"], db)  # (B,N,out) → cross_attention_states (B,N,D)

    def cross_layer(rows: int, keys: int, cached: bool) -> StageCost:  # q from text, attention over keys, out, MLP
        cost = _dense(B * rows, p["qo"] + p["mlp"], db) + _attention(B, H, rows, keys, Dh, db) + _io(2 * D + Dh + 2, db)
        return cost + _io(2 * B * KV * keys * Dh * cached, db)  # decode: the cross K/V (B,KV,keys,Dh) read

    def self_layer(rows: int, cached: int) -> StageCost:  # attention over cached slots + the new rows, MLP
        cost = _dense(B * rows, p["qo"] + p["kv"] + p["mlp"], db) + _attention(B, H, rows, cached + rows, Dh, db)
        return cost + _io(2 * D + 2 * B * KV * cached * Dh, db)  # RMSNorms, past K/V (B,KV,cached,Dh) read

    num_self, later = d["L"] - len(d["cross"]), len(d["cross"]) - 1
    first_keys = k if trim_first_layer else N
    text_prefill = _io(2 * B * T * D, db) + num_self * self_layer(T, 0) + lm_head  # embedding rows read, written
    first = _io(B * N * D, db) + _dense(B * N, p["kv"], db) + _io(Dh, db)  # states read; K/V (B,KV,N,Dh), k_norm
    first += cross_layer(T, first_keys, False) + _io(2 * B * KV * k * Dh * trim_first_layer, db)  # trimmed: K/V gathered
    # the scoring pass: q again (weights already read) and Q·Kᵀ over all N → probs (B,H,T,N); trim-sum weights the
    # voting rows and sums over heads and rows (2·B·H·T·N); scores (B,N) fp32, kept cross mask (B,T,k) gathered
    scoring = _dense(B * T, p["q"], db, weights=False) + _attention(B, H, T, N, Dh, db, context=False)
    scoring += StageCost(2 * B * H * T * N, 4.0 * B * N) + _io(B * T * k, db)
    kv_build = later * (_io(B * k * D, db) + _dense(B * k, p["kv"], db) + _io(Dh, db))  # kept states (B,k,D) → K/V
    cross_prefill = later * cross_layer(T, k, False)
    cache = T + new_tokens - 1
    text_step = _io(2 * B * D, db) + num_self * self_layer(1, cache) + lm_head
    cross_step = cross_layer(1, first_keys, True) + later * cross_layer(1, k, True)
    steps = new_tokens - 1
    return _stages(visual={"vision_encoder": vision, "projection": projection},
                   prefill={"text_prefill": text_prefill, "first_cross_attention": first, "scoring": scoring,
                            "cross_kv_build": kv_build, "cross_attention_prefill": cross_prefill},
                   decode={"text_decode": steps * text_step, "cross_attention_decode": steps * cross_step})


@dataclass(frozen=True)
class Family:
    costs: Callable[..., dict[str, StageCost]]  # (config, k, T, B, new_tokens, dtype_bytes, trim_first_layer)
    parameters: Callable[[Config], int]
    visual_tokens: Callable[[Config], int]  # N: what ``kept`` counts out of


FAMILIES: dict[str, Family] = {
    "blip-2": Family(_blip2_costs, blip2_parameters, lambda c: _blip2_dims(c)["Q"]),
    "mllama": Family(_mllama_costs, mllama_parameters, lambda c: _mllama_dims(c)["N"]),
}


def family(config: Config) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise CheckpointError(f"config.json: model_type {model_type!r} has no FLOP model (known: {', '.join(FAMILIES)})")
    return FAMILIES[model_type]


def stage_costs(config: Config, *, kept: int, text_len: int, batch: int, new_tokens: int, dtype_bytes: int = 4,
                trim_first_layer: bool = False) -> dict[str, StageCost]:
    """{stage or "stage.sub": cost} for one batch: ``batch`` prompts of ``text_len`` tokens, ``kept`` visual tokens,
    ``new_tokens`` generated (the first by the prefill, ``new_tokens − 1`` decode steps)."""
    return family(config).costs(config, kept, text_len, batch, new_tokens, dtype_bytes, trim_first_layer)


def parameter_count(config: Config) -> int:
    """Parameters implied by the same per-layer shapes (norms, biases, embeddings included)."""
    return family(config).parameters(config)


def num_visual_tokens(config: Config) -> int:
    """N, the visual tokens pruning keeps ``kept`` of (BLIP-2: the Q queries; Mllama: tiles × (patches + 1))."""
    return family(config).visual_tokens(config)


def speedup(full: dict[str, StageCost], pruned: dict[str, StageCost]) -> dict[str, float]:
    """FLOPs full / pruned per key of ``full`` and for ``"total"`` (the stages without sub-stages); 0/0 is 1.0."""
    def ratio(a: float, b: float) -> float:  # 0/0 (no decode step) is 1.0
        return 1.0 if a == b else (a / b if b else float("inf"))

    out = {key: ratio(cost.flops, pruned[key].flops) for key, cost in full.items()}
    stages = [key for key in full if "." not in key and key != "total"]
    out["total"] = ratio(sum(full[s].flops for s in stages), sum(pruned[s].flops for s in stages))
    return out
