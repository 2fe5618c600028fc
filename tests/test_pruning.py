"""The pruning module alone: voting, baselines, ratio edges, ties, and the selection's ONNX twin."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import pruning
from export.pruning import PruningConfig, Signals
from runtime.errors import UsageError


def independent_catp(cross_attentions, layer_weights, token_weights=None):
    """papers.md voting with plain loops: every (layer, head, image token) ranks all queries (stable order)."""
    first = cross_attentions[0]
    batch, heads, queries, patches = first.shape
    score = np.zeros((batch, queries))
    for weight, probs in zip(layer_weights, cross_attentions):
        probs = np.asarray(probs, dtype=np.float64)
        for b in range(batch):
            for h in range(heads):
                for j in range(patches):
                    order = np.argsort(probs[b, h, :, j], kind="stable")  # lowest first
                    u = 1.0 if token_weights is None else token_weights[b, j]
                    for rank, q in enumerate(order):
                        score[b, q] += weight * u * rank
    return score


def independent_keep(score_row, k):
    """The k best, ties to the lower index, as a set."""
    return set(sorted(range(len(score_row)), key=lambda q: (-score_row[q], q))[:k])


# ------------------------------------------------------------------------------------------------ ratio / k


@pytest.mark.parametrize("n, ratio, k", [(32, 0.0, 32), (32, 0.5, 16), (32, 0.75, 8), (32, 0.875, 4), (32, 0.9375, 2),
                                         (32, 0.99, 1), (8, 0.33, 5), (6404, 0.5, 3202)])
def test_keep_count(n, ratio, k):
    assert pruning.keep_count(n, ratio) == k


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan"), float("inf")])
def test_ratio_outside_range_is_rejected(ratio):
    with pytest.raises(UsageError, match=r"\[0, 1\)"):
        pruning.keep_count(32, ratio)


# ------------------------------------------------------------------------------------------------ layer weights


def test_layer_weight_presets():
    assert pruning.parse_layer_weights("uniform", 3) == [1.0, 1.0, 1.0]
    assert pruning.parse_layer_weights("first", 3) == [1.0, 0.0, 0.0]
    assert pruning.parse_layer_weights("last", 3) == [0.0, 0.0, 1.0]
    assert pruning.parse_layer_weights("first+last", 4) == [1.0, 0.0, 0.0, 1.0]
    assert pruning.parse_layer_weights("first+last", 1) == [1.0]
    assert pruning.parse_layer_weights("0.5,0,2", 3) == [0.5, 0.0, 2.0]


@pytest.mark.parametrize("spec, match", [("1,2", "2 weight"), ("a,b,c", "comma-separated"), ("0,0,0", "not all zero"),
                                         ("1,-1,1", "non-negative")])
def test_bad_layer_weights(spec, match):
    with pytest.raises(UsageError, match=match):
        pruning.parse_layer_weights(spec, 3)


# ------------------------------------------------------------------------------------------------ voting


def hand_example():
    # one batch row, one head, Q = 3 queries, P = 2 image tokens; ranks are taken down each column j
    layer0 = torch.tensor([[[[0.5, 0.1], [0.3, 0.6], [0.2, 0.3]]]])  # column 0 ranks q0=2,q1=1,q2=0; column 1 q0=0,q1=2,q2=1
    layer1 = torch.tensor([[[[0.2, 0.4], [0.2, 0.35], [0.6, 0.25]]]])  # column 0 tie q0/q1 → q0=0,q1=1,q2=2; column 1 q0=2,q1=1,q2=0
    return layer0, layer1


def test_stable_ranks_by_hand():
    layer0, layer1 = hand_example()
    assert pruning.stable_ranks(layer0, dim=2)[0, 0].tolist() == [[2, 0], [1, 2], [0, 1]]
    assert pruning.stable_ranks(layer1, dim=2)[0, 0].tolist() == [[0, 2], [1, 1], [2, 0]]  # tie: lower index ranks lower


@pytest.mark.parametrize("case", ["distinct", "ties", "few values"])
def test_sorted_ranks_equal_pairwise_count_eager_and_exported(case, tmp_path):
    """The sort-based ranks (TopK + inverse-permutation scatter when exported) equal the pairwise definition
    exactly, ties included, in eager PyTorch and in ONNX Runtime."""
    from export.selection import counted_ranks

    generator = torch.Generator().manual_seed(3)
    values = torch.rand(2, 3, 32, 17, generator=generator)  # (B, heads, Q, P): ranks down the Q axis
    if case == "ties":
        values[:, :, :10] = 0.5
        values[:, :, 15:20] = values[:, :, 30:31]
    elif case == "few values":
        values = torch.randint(0, 3, values.shape, generator=generator).float()
    expected = counted_ranks(values, dim=2)
    assert torch.equal(pruning.stable_ranks(values, dim=2), expected)

    class Ranks(torch.nn.Module):
        def forward(self, probs):
            return pruning.stable_ranks(probs, dim=2)

    path = tmp_path / "ranks.onnx"
    torch.onnx.export(Ranks(), (values,), str(path), opset_version=17, dynamo=False, input_names=["probs"])
    assert "TopK" in {node.op_type for node in onnx.load(str(path)).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"probs": values.numpy()})[0], expected.numpy())


def test_catp_voting_by_hand():
    layer0, layer1 = hand_example()
    assert pruning.catp_scores([layer0], [1.0]).tolist() == [[2.0, 3.0, 1.0]]
    # layer 1 alone gives [2, 2, 2]; weighted 0.5 on top of layer 0
    assert pruning.catp_scores([layer0, layer1], [1.0, 0.5]).tolist() == [[3.0, 4.0, 2.0]]
    # a zero weight drops the layer
    assert pruning.catp_scores([layer0, layer1], [0.0, 1.0]).tolist() == [[2.0, 2.0, 2.0]]
    # image-token importance multiplies the votes of each column: u = [3, 1]
    assert pruning.catp_scores([layer0], [1.0], torch.tensor([[3.0, 1.0]])).tolist() == [[6.0, 5.0, 1.0]]
    scores = pruning.catp_scores([layer0], [1.0])
    assert pruning.select_top_k(scores, 2).tolist() == [[0, 1]]
    assert pruning.select_top_k(scores, 1).tolist() == [[1]]


def test_raw_probabilities_would_tie():
    """Why voting: rows sum to 1 over image tokens, so summing probabilities gives every query the same total."""
    probs = torch.softmax(torch.randn(1, 2, 5, 7), dim=-1)
    totals = probs.sum(dim=(1, 3))
    assert torch.allclose(totals, totals[:, :1].expand_as(totals))
    assert len(set(pruning.catp_scores([probs], [1.0])[0].tolist())) > 1


def test_image_token_weights_by_hand():
    uniform = torch.tensor([[[[0.75, 0.25], [0.25, 0.75]]]])
    assert pruning.image_token_weights(uniform).tolist() == [[1.0, 1.0]]
    one_sided = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert pruning.image_token_weights(one_sided).tolist() == [[2.0, 0.0]]


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.2, 0.0, 3.0]])
@pytest.mark.parametrize("with_importance", [False, True])
def test_catp_matches_independent_loops(weights, with_importance):
    generator = torch.Generator().manual_seed(7)
    cross = [torch.softmax(torch.randn(2, 3, 8, 5, generator=generator), dim=-1) for _ in weights]
    vision = torch.softmax(torch.randn(2, 2, 5, 5, generator=generator), dim=-1)
    u = pruning.image_token_weights(vision) if with_importance else None
    ours = pruning.catp_scores(cross, weights, u).numpy()
    expected = independent_catp([c.numpy() for c in cross], weights, None if u is None else u.numpy())
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    for k in (1, 3, 4, 7, 8):
        kept = pruning.select_top_k(torch.from_numpy(ours), k)
        for row in range(2):
            assert set(kept[row].tolist()) == independent_keep(expected[row], k)
            assert kept[row].tolist() == sorted(kept[row].tolist())


def test_rank_bounds_by_hand():
    values = torch.tensor([[1.0, 1.0 + 1e-7, 0.5, 2.0]])
    lower, upper = pruning.rank_bounds(values, dim=1, tie_rtol=1e-6)
    assert lower.tolist() == [[1, 1, 0, 3]] and upper.tolist() == [[2, 2, 0, 3]]  # the two near-equal values tie
    exact_lower, exact_upper = pruning.rank_bounds(values, dim=1, tie_rtol=0.0)
    assert exact_lower.tolist() == exact_upper.tolist() == pruning.stable_ranks(values, dim=1).tolist()


@pytest.mark.parametrize("with_importance", [False, True])
def test_catp_bounds_contain_every_nearby_backend(with_importance):
    """Scores of probabilities perturbed by a relative 1e-6 (another backend's rounding) lie inside the bounds
    computed with a tie tolerance of 2e-6 + rounding; the unperturbed scores do too; bounds really widen on near-ties."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(2, 3, 16, 9, generator=generator)
    logits[..., 4, :] = logits[..., 5, :] + 1e-7  # queries 4 and 5 attend alike: their ranks are float noise
    cross = [torch.softmax(logits, dim=-1), torch.softmax(torch.randn(2, 3, 16, 9, generator=generator), dim=-1)]
    vision = torch.softmax(torch.randn(2, 2, 9, 9, generator=generator), dim=-1)
    u = pruning.image_token_weights(vision) if with_importance else None
    lower, upper = pruning.catp_score_bounds(cross, [1.0, 0.5], u, tie_rtol=2.5e-6)
    scores = pruning.catp_scores(cross, [1.0, 0.5], u).double()
    assert bool(((lower - 1e-3 <= scores) & (scores <= upper + 1e-3)).all())  # float32 sums vs float64 bounds
    assert bool((upper[:, 4] > lower[:, 4]).all()) and bool((upper[:, 5] > lower[:, 5]).all())
    for trial in range(5):
        noise = 1 + 1e-6 * (2 * torch.rand(cross[0].shape, generator=generator) - 1)
        perturbed = [cross[0] * noise, cross[1]]
        other = pruning.catp_scores(perturbed, [1.0, 0.5], u).double()
        assert bool(((lower - 1e-3 <= other) & (other <= upper + 1e-3)).all()), trial
    config = PruningConfig(method="catp", image_importance=with_importance)
    sig = Signals(tokens=torch.zeros(2, 16, 3), cross_attentions=cross, vision_attention=vision)
    via_registry = pruning.score_bounds(sig, [1.0, 0.5], config, tie_rtol=2.5e-6)
    assert torch.equal(via_registry[0], lower) and torch.equal(via_registry[1], upper)
    assert pruning.score_bounds(sig, [1.0, 0.5], PruningConfig(method="l2"), tie_rtol=2.5e-6) is None


# ------------------------------------------------------------------------------------------------ baselines


def signals(batch=2, queries=6, patches=4, heads=2, dim=5):
    generator = torch.Generator().manual_seed(3)
    return Signals(
        tokens=torch.randn(batch, queries, dim, generator=generator),
        cross_attentions=[torch.softmax(torch.randn(batch, heads, queries, patches, generator=generator), -1)],
        self_attentions=[torch.softmax(torch.randn(batch, heads, queries, queries, generator=generator), -1) for _ in range(2)],
        vision_attention=torch.softmax(torch.randn(batch, heads, patches, patches, generator=generator), -1),
    )


@pytest.mark.parametrize("method", list(pruning.METHODS))
def test_every_method_scores_and_selects(method):
    s = signals()
    config = PruningConfig(method=method, image_importance=(method == "catp"))
    scores = pruning.score_tokens(s, [1.0], config)
    assert scores.shape == (2, 6) and scores.dtype == torch.float32
    kept = pruning.select_top_k(scores, 3)
    assert kept.shape == (2, 3)
    assert all(row == sorted(row) and len(set(row)) == 3 for row in kept.tolist())


def test_baselines_by_definition():
    s = signals()
    np.testing.assert_allclose(pruning.l2_scores(s.tokens), np.linalg.norm(s.tokens.numpy(), axis=-1), rtol=1e-6)
    received = sum(p.numpy().sum(axis=(1, 2)) for p in s.self_attentions)
    np.testing.assert_allclose(pruning.self_attention_scores(s.self_attentions), received, rtol=1e-6)
    first = pruning.select_top_k(pruning.first_k_scores(s.tokens), 4)
    assert first.tolist() == [[0, 1, 2, 3]] * 2


def test_random_is_seeded_and_input_independent():
    a = pruning.random_scores(torch.randn(3, 10, 2), seed=1)
    b = pruning.random_scores(torch.randn(3, 10, 2), seed=1)
    c = pruning.random_scores(torch.randn(3, 10, 2), seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[0], a[2])


def test_unknown_method():
    with pytest.raises(UsageError, match="unknown --method"):
        pruning.check_method("topk-magic")


# ------------------------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("scores, k, expected", [
    ([1, 1, 1, 1], 2, [0, 1]),
    ([1, 1, 1, 1], 3, [0, 1, 2]),
    ([0, 5, 5, 1, 5], 2, [1, 2]),
    ([0, 5, 5, 1, 5], 3, [1, 2, 4]),
    ([0, 5, 5, 1, 5], 4, [1, 2, 3, 4]),
    ([5, 5, 5, 0, 0], 4, [0, 1, 2, 3]),
    ([2, 3, 1], 1, [1]),
    ([2, 3, 1], 3, [0, 1, 2]),
])
def test_ties_lower_index_wins(scores, k, expected):
    assert pruning.select_top_k(torch.tensor([scores], dtype=torch.float32), k).tolist() == [expected]


def topk_k_values(model: onnx.ModelProto) -> list[int]:
    """The static K of every TopK node, read from shape inference (with data propagation) of its output."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: v.type.tensor_type.shape for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    sizes = []
    for node in inferred.graph.node:
        if node.op_type == "TopK":
            dim = shapes[node.output[0]].dim[-1]
            assert dim.HasField("dim_value"), f"TopK {node.name} has no static K"
            sizes.append(int(dim.dim_value))
    return sizes


class _Select(torch.nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, scores):
        return pruning.select_top_k(scores, self.k)


def export_select(tmp_path, num_tokens, k):
    path = tmp_path / f"select_{num_tokens}_{k}.onnx"
    torch.onnx.export(_Select(k), (torch.randn(2, num_tokens),), str(path), dynamo=False, input_names=["scores"],
                      output_names=["kept"], dynamic_axes={"scores": {0: "b"}, "kept": {0: "b"}}, opset_version=17)
    return path


@pytest.mark.parametrize("num_tokens, k", [(12, 1), (12, 5), (12, 6), (12, 7), (12, 11)])
def test_onnx_selection_equals_eager_on_ties(tmp_path, num_tokens, k):
    session = ort.InferenceSession(str(export_select(tmp_path, num_tokens, k)), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 3, size=(4, num_tokens)).astype(np.float32),  # many ties
               np.zeros((3, num_tokens), np.float32),  # all tied
               rng.standard_normal((5, num_tokens)).astype(np.float32)]
    for scores in batches:
        (onnx_kept,) = session.run(None, {"scores": scores})
        eager = pruning.select_top_k(torch.from_numpy(scores), k).numpy()
        np.testing.assert_array_equal(onnx_kept, eager)
        for row in range(scores.shape[0]):
            assert set(eager[row].tolist()) == independent_keep(scores[row].tolist(), k)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_no_topk_over_tensorrt_limit_at_large_n(tmp_path, ratio):
    """TensorRT's TopK takes K ≤ 3840: selection at N = 6404 (LLaMA-3.2-Vision, one image) must stay under it."""
    num_tokens = 6404
    k = pruning.keep_count(num_tokens, ratio)
    model = onnx.load(str(export_select(tmp_path, num_tokens, k)))
    topk_sizes = topk_k_values(model)
    assert all(size <= 3840 for size in topk_sizes), topk_sizes
    assert topk_sizes == ([] if k == num_tokens else [min(k, num_tokens - k)])
    scores = np.random.default_rng(1).standard_normal((1, num_tokens)).astype(np.float32)
    (kept,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"scores": scores})
    assert set(kept[0].tolist()) == set(np.argsort(-scores[0], kind="stable")[:k].tolist())
