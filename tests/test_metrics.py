"""Tests of estimators.metrics: hand-worked cases, brute-force and sklearn
cross-checks, streaming/merging exactness, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, multilabel_confusion_matrix, recall_score
from sklearn.preprocessing import MultiLabelBinarizer

from estimators import metrics as M
from estimators.metrics import (
    MetricAccumulator,
    RoutingMetrics,
    compute_metrics,
    exact_match,
    hits_per_token,
    mean_over_layers,
    per_layer_table,
    rank_alignment,
    recall_at_k,
    top1_hit,
    topk_from_logits,
    weighted_recall,
)

# --------------------------------------------------------------------------- #
# Hand-worked cases (expected values computed on paper)
# --------------------------------------------------------------------------- #

# k = 3, four tokens.  True ids are in "model order" (not sorted by weight).
#
# A  true [5, 1, 7] w [.2, .5, .3]   sorted by weight: 1 (.5), 7 (.3), 5 (.2)
#    pred [7, 1, 5]  same SET, other order
#    hits 3, recall 1, wrec 1, exact 1, top1 1 (expert 1 predicted),
#    ranks: 7 vs 1 no, 1 vs 7 no, 5 vs 5 yes          -> [0, 0, 1]
# B  true [2, 3, 4] w [.25, .5, .25] sorted: 3 (.5), then 2 and 4 tied (.25)
#    pred [3, 4, 9]
#    hits 2, wrec .75, exact 0, top1 1,
#    ranks: 3 = 3 yes; 4 has weight .25 = 2nd largest (tie with 2) yes; 9 no -> [1, 1, 0]
# C  true [0, 6, 2] w [.4, .4, .2]  tie at the top (0 and 6)
#    pred [6, 8, 9]
#    hits 1, wrec .4, exact 0, top1 1 (6 is one of the tied top experts),
#    ranks: 6 has the largest weight yes; 8 no; 9 no  -> [1, 0, 0]
# D  true [3, 0, 1] w [1, 2, 5]  (unnormalised: sum 8) sorted: 1 (5), 0 (2), 3 (1)
#    pred [0, 3, 4]
#    hits 2, wrec (2 + 1) / 8 = .375, exact 0, top1 0 (expert 1 missed),
#    ranks: 0 vs 1 no; 3 vs 0 no; 4 no  -> [0, 0, 0]
#
# Means over the 4 tokens:
#    recall   (3 + 2 + 1 + 2) / 12 = 0.6666...
#    wrec     (1 + .75 + .4 + .375) / 4 = 0.63125
#    exact    1 / 4 = 0.25
#    top1     3 / 4 = 0.75
#    ranks    [2/4, 1/4, 1/4] = [0.5, 0.25, 0.25]
HAND3_PRED = [[7, 1, 5], [3, 4, 9], [6, 8, 9], [0, 3, 4]]
HAND3_TRUE = [[5, 1, 7], [2, 3, 4], [0, 6, 2], [3, 0, 1]]
HAND3_W = [[0.2, 0.5, 0.3], [0.25, 0.5, 0.25], [0.4, 0.4, 0.2], [1.0, 2.0, 5.0]]
HAND3_EXPECTED = dict(
    hits=[3, 2, 1, 2],
    recall=0.6666666666666666,
    weighted_recall=0.63125,
    exact_match=0.25,
    top1=0.75,
    rank_alignment=[0.5, 0.25, 0.25],
    tokens=4,
)

# k = 2, three tokens.
# E  true [4, 9] w [.7, .3]   pred [4, 9]  identical: hits 2, wrec 1, exact 1, top1 1, ranks [1, 1]
# F  true [1, 2] w [.5, .5]   pred [2, 1]  tie, swapped: hits 2, wrec 1, exact 1, top1 1,
#                                          ranks (tie-aware) [1, 1]
# G  true [0, 3] w [.1, .9]   pred [3, 5]  hits 1, wrec .9, exact 0, top1 1, ranks: 3 = 3 yes, 5 no -> [1, 0]
# Means: recall 5/6 = 0.8333..., wrec 2.9/3 = 0.9666..., exact 2/3, top1 1, ranks [1, 2/3]
HAND2_PRED = [[4, 9], [2, 1], [3, 5]]
HAND2_TRUE = [[4, 9], [1, 2], [0, 3]]
HAND2_W = [[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]]
HAND2_EXPECTED = dict(
    hits=[2, 2, 1],
    recall=0.8333333333333334,
    weighted_recall=0.9666666666666667,
    exact_match=0.6666666666666666,
    top1=1.0,
    rank_alignment=[1.0, 0.6666666666666666],
    tokens=3,
)

HAND_CASES = [
    pytest.param(HAND3_PRED, HAND3_TRUE, HAND3_W, HAND3_EXPECTED, id="k3"),
    pytest.param(HAND2_PRED, HAND2_TRUE, HAND2_W, HAND2_EXPECTED, id="k2"),
]
TOL = dict(abs=1e-7)  # float32 weights such as 0.4 are not exact


def _tensors(pred, true, w, wdtype=torch.float32):
    return torch.tensor(pred), torch.tensor(true), torch.tensor(w, dtype=wdtype)


@pytest.mark.parametrize("pred,true,w,exp", HAND_CASES)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hand_cases_single_functions(pred, true, w, exp, wdtype):
    p, t, w = _tensors(pred, true, w, wdtype)
    tol = TOL if wdtype != torch.bfloat16 else dict(abs=5e-3)  # bf16 rounds 0.4, 0.3, ...
    assert hits_per_token(p, t).tolist() == exp["hits"]
    assert hits_per_token(p, t).dtype == torch.int64
    assert recall_at_k(p, t) == pytest.approx(exp["recall"], abs=1e-12)
    assert weighted_recall(p, t, w) == pytest.approx(exp["weighted_recall"], **tol)
    assert exact_match(p, t) == pytest.approx(exp["exact_match"], abs=1e-12)
    assert top1_hit(p, t, w) == pytest.approx(exp["top1"], abs=1e-12)
    ra = rank_alignment(p, t, w)
    assert isinstance(ra, torch.Tensor) and ra.shape == (t.shape[1],)
    assert ra.tolist() == pytest.approx(exp["rank_alignment"], abs=1e-12)


@pytest.mark.parametrize("pred,true,w,exp", HAND_CASES)
def test_hand_cases_compute_metrics(pred, true, w, exp):
    m = compute_metrics(*_tensors(pred, true, w))
    assert isinstance(m, RoutingMetrics)
    assert m.tokens == exp["tokens"]
    assert m.recall == pytest.approx(exp["recall"], abs=1e-12)
    assert m.weighted_recall == pytest.approx(exp["weighted_recall"], **TOL)
    assert m.exact_match == pytest.approx(exp["exact_match"], abs=1e-12)
    assert m.top1 == pytest.approx(exp["top1"], abs=1e-12)
    assert m.rank_alignment == pytest.approx(exp["rank_alignment"], abs=1e-12)
    assert isinstance(m.rank_alignment, list) and m.k == len(exp["rank_alignment"])


def test_hand_case_permuting_true_order_changes_nothing():
    # the model's slot order must not matter: permute true ids and weights together
    p, t, w = _tensors(HAND3_PRED, HAND3_TRUE, HAND3_W)
    perm = torch.tensor([2, 0, 1])
    assert compute_metrics(p, t[:, perm], w[:, perm]) == compute_metrics(p, t, w)


def test_weight_scale_does_not_matter():
    p, t, w = _tensors(HAND3_PRED, HAND3_TRUE, HAND3_W, torch.float64)
    # multiplying a row by a power of two is exact, so results are identical
    assert compute_metrics(p, t, w * 8) == compute_metrics(p, t, w)


def test_zero_weight_token_falls_back_to_plain_share():
    p = torch.tensor([[0, 5]])
    t = torch.tensor([[0, 1]])
    w = torch.zeros(1, 2)
    assert weighted_recall(p, t, w) == 0.5
    # all weights tie at 0: expert 0 is a top expert, and ranks are interchangeable
    assert top1_hit(p, t, w) == 1.0
    assert rank_alignment(p, t, w).tolist() == [1.0, 0.0]


def test_leading_dims_are_flattened():
    p, t, w = _tensors(HAND3_PRED, HAND3_TRUE, HAND3_W)
    m3 = compute_metrics(p.view(2, 2, 3), t.view(2, 2, 3), w.view(2, 2, 3))
    assert m3 == compute_metrics(p, t, w)
    assert hits_per_token(p.view(2, 2, 3), t.view(2, 2, 3)).tolist() == HAND3_EXPECTED["hits"]


def test_hits_per_token_accepts_a_wider_prefetch():
    t = torch.tensor(HAND3_TRUE)
    wider = torch.tensor([[7, 1, 5, 0], [3, 4, 9, 2], [6, 8, 9, 1], [0, 3, 4, 1]])
    assert hits_per_token(wider, t).tolist() == [3, 3, 1, 3]


def test_topk_from_logits():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    ids = topk_from_logits(logits, 3)
    assert ids.tolist() == [[1, 3, 4], [0, 1, 2]]
    assert ids.dtype == torch.int64
    # a monotone transform (softmax) gives the same ids
    assert torch.equal(topk_from_logits(logits.softmax(-1), 3), ids)
    # works on [B, T, E]
    assert topk_from_logits(torch.randn(2, 5, 16), 4).shape == (2, 5, 4)


# --------------------------------------------------------------------------- #
# Brute force (plain Python, written independently) and sklearn
# --------------------------------------------------------------------------- #


def brute_force(pred, true, w):
    """Reference: one token at a time, with Python sets and sorted lists."""
    pred, true, w = pred.tolist(), true.tolist(), w.double().tolist()
    n, k = len(true), len(true[0])
    hits, wcov, exact, top1 = [], [], 0, 0
    ranks = [0] * k
    for p, t, ws in zip(pred, true, w):
        weight_of = dict(zip(t, ws))
        inter = set(p) & set(t)
        hits.append(len(inter))
        total = sum(ws)
        wcov.append(sum(weight_of[e] for e in inter) / total if total > 0 else len(inter) / k)
        exact += set(p) == set(t)
        best = max(ws)
        top1 += any(weight_of[e] == best for e in inter)
        by_weight = sorted(ws, reverse=True)
        for r in range(k):
            ranks[r] += p[r] in weight_of and weight_of[p[r]] == by_weight[r]
    return dict(
        hits=hits,
        recall=sum(hits) / (n * k),
        weighted_recall=math.fsum(wcov) / n,
        exact_match=exact / n,
        top1=top1 / n,
        rank_alignment=[c / n for c in ranks],
    )


def random_routing(n=500, e=16, k=4, seed=0, noise=1.0, tie_levels=None):
    """True top-k of random logits, shuffled into a random slot order; a noisy
    prediction; weights either continuous or quantised to create ties."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g)
    weights, ids = torch.topk(logits.softmax(-1), k)
    if tie_levels:
        weights = torch.randint(1, tie_levels + 1, (n, k), generator=g).float() / tie_levels
    shuffle = torch.rand(n, k, generator=g).argsort(dim=1)
    true, w = ids.gather(1, shuffle), weights.gather(1, shuffle)
    pred = topk_from_logits(logits + noise * torch.randn(n, e, generator=g), k)
    return pred, true, w


RANDOM_CASES = [
    pytest.param(dict(seed=0), id="continuous"),
    pytest.param(dict(seed=1, noise=0.3), id="close"),
    pytest.param(dict(seed=2, noise=5.0), id="far"),
    pytest.param(dict(seed=3, tie_levels=3), id="many-ties"),
    pytest.param(dict(seed=4, tie_levels=1), id="all-tied"),
]


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_against_brute_force(case):
    pred, true, w = random_routing(**case)
    ref = brute_force(pred, true, w)
    assert hits_per_token(pred, true).tolist() == ref["hits"]
    assert recall_at_k(pred, true) == pytest.approx(ref["recall"], abs=1e-12)
    assert weighted_recall(pred, true, w) == pytest.approx(ref["weighted_recall"], abs=1e-9)
    assert exact_match(pred, true) == pytest.approx(ref["exact_match"], abs=1e-12)
    assert top1_hit(pred, true, w) == pytest.approx(ref["top1"], abs=1e-12)
    assert rank_alignment(pred, true, w).tolist() == pytest.approx(ref["rank_alignment"], abs=1e-12)
    m = compute_metrics(pred, true, w)
    assert m.recall == pytest.approx(ref["recall"], abs=1e-12)
    assert m.weighted_recall == pytest.approx(ref["weighted_recall"], abs=1e-9)
    assert m.exact_match == pytest.approx(ref["exact_match"], abs=1e-12)
    assert m.top1 == pytest.approx(ref["top1"], abs=1e-12)
    assert m.rank_alignment == pytest.approx(ref["rank_alignment"], abs=1e-12)
    assert m.tokens == 500


def test_nontrivial_random_case():
    # guard against a degenerate generator making the cross-checks vacuous
    pred, true, w = random_routing(seed=0)
    ref = brute_force(pred, true, w)
    assert 0.2 < ref["recall"] < 0.95
    assert 0 < ref["exact_match"] < 1
    assert all(0 < r < 1 for r in ref["rank_alignment"])


def test_rank_alignment_without_ties_is_plain_positional_equality():
    pred, true, w = random_routing(seed=5)
    assert len(set(w.flatten().tolist())) == w.numel()  # continuous weights: no ties
    expected = [0] * 4
    for p, t, ws in zip(pred.tolist(), true.tolist(), w.tolist()):
        true_by_weight = [e for _, e in sorted(zip(ws, t), reverse=True)]
        for r in range(4):
            expected[r] += p[r] == true_by_weight[r]
    assert rank_alignment(pred, true, w).tolist() == pytest.approx([c / 500 for c in expected], abs=1e-12)


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_rank_tie_paths_agree(case):
    # CPU handles tied rows on their own, accelerators handle all rows at once
    pred, true, w = random_routing(**case)
    a = M._rank_flags(pred, true, w, subset_ties=True)
    b = M._rank_flags(pred, true, w, subset_ties=False)
    assert torch.equal(a, b)


def _multi_hot(ids, e):
    return MultiLabelBinarizer(classes=list(range(e))).fit_transform(ids.tolist())


@pytest.mark.parametrize("case", RANDOM_CASES[:3])
def test_against_sklearn(case):
    pred, true, w = random_routing(**case)
    y_pred, y_true = _multi_hot(pred, 16), _multi_hot(true, 16)
    # recall per sample = |pred ∩ true| / |true| = hits / k
    assert recall_at_k(pred, true) == pytest.approx(recall_score(y_true, y_pred, average="samples"), abs=1e-12)
    # subset accuracy on multilabel indicators = exact set match
    assert exact_match(pred, true) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    # true positives per sample = hits per token
    tp = multilabel_confusion_matrix(y_true, y_pred, samplewise=True)[:, 1, 1]
    assert hits_per_token(pred, true).numpy().tolist() == tp.tolist()
    # weighted recall: per-sample weighted dot product of indicators
    w_dense = np.zeros((500, 16))
    np.put_along_axis(w_dense, true.numpy(), w.double().numpy(), axis=1)
    cov = (w_dense * y_pred).sum(1) / w_dense.sum(1)
    assert weighted_recall(pred, true, w) == pytest.approx(cov.mean(), abs=1e-9)


# --------------------------------------------------------------------------- #
# Streaming, merging, distributed state
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", RANDOM_CASES)
def test_accumulator_uneven_batches_equals_one_shot(case):
    pred, true, w = random_routing(**case)
    one_shot = compute_metrics(pred, true, w)
    acc = MetricAccumulator()
    bounds = [0, 1, 1, 8, 131, 132, 400, 500]  # includes an empty batch and a single token
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(pred[a:b], true[a:b], w[a:b])
    assert acc.tokens == 500
    assert acc.compute() == one_shot  # bit-identical, not just close


def test_internal_chunking_is_exact(monkeypatch):
    pred, true, w = random_routing(seed=0)
    one_shot = compute_metrics(pred, true, w)
    monkeypatch.setattr(M, "CHUNK_ROWS", 7)
    assert compute_metrics(pred, true, w) == one_shot
    assert hits_per_token(pred, true).tolist() == brute_force(pred, true, w)["hits"]
    assert rank_alignment(pred, true, w).tolist() == one_shot.rank_alignment


def test_merge_equals_one_shot():
    pred, true, w = random_routing(seed=3, tie_levels=3)
    a = MetricAccumulator().update(pred[:173], true[:173], w[:173])
    b = MetricAccumulator().update(pred[173:300], true[173:300], w[173:300]).update(pred[300:], true[300:], w[300:])
    assert a.merge(b) is a
    assert a.compute() == compute_metrics(pred, true, w)
    # merging an empty accumulator changes nothing; merging into an empty one copies
    assert a.merge(MetricAccumulator()).compute() == compute_metrics(pred, true, w)
    assert MetricAccumulator().merge(b).compute() == compute_metrics(pred[173:], true[173:], w[173:])


def test_state_tensor_sum_equals_one_shot():
    # what an all-reduce across two processes does
    pred, true, w = random_routing(seed=0)
    s0 = MetricAccumulator(k=4).update(pred[:250], true[:250], w[:250]).state_tensor()
    s1 = MetricAccumulator(k=4).update(pred[250:], true[250:], w[250:]).state_tensor()
    idle = MetricAccumulator(k=4).state_tensor()  # a rank that saw no batch
    assert s0.dtype == torch.int64 and s0.shape == (5 + 4,) and idle.shape == s0.shape
    summed = MetricAccumulator.from_state_tensor(s0 + s1 + idle)
    assert summed.k == 4
    assert summed.compute() == compute_metrics(pred, true, w)


def test_state_tensor_is_a_copy_and_reset():
    pred, true, w = random_routing(seed=0)
    acc = MetricAccumulator().update(pred, true, w)
    s = acc.state_tensor()
    s.zero_()
    assert acc.tokens == 500
    acc.reset()
    assert acc.tokens == 0
    with pytest.raises(ValueError, match="zero tokens"):
        acc.compute()


def test_sync_without_distributed_is_noop():
    pred, true, w = random_routing(seed=0)
    acc = MetricAccumulator().update(pred, true, w)
    assert acc.sync().compute() == compute_metrics(pred, true, w)


def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        pred, true, w = random_routing(seed=0)
        half = slice(0, 211) if rank == 0 else slice(211, 500)
        acc = MetricAccumulator(k=4).update(pred[half], true[half], w[half]).sync()
        if rank == 0:
            with open(path, "w") as f:
                json.dump(acc.compute().to_dict(), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_all_reduces_over_gloo(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "m.json"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    pred, true, w = random_routing(seed=0)
    assert RoutingMetrics.from_dict(json.loads(out.read_text())) == compute_metrics(pred, true, w)


# --------------------------------------------------------------------------- #
# Summaries and tables
# --------------------------------------------------------------------------- #


def _rm(recall, tokens=100, ranks=(0.5, 0.25)):
    return RoutingMetrics(
        recall=recall, weighted_recall=recall + 0.05, exact_match=recall / 2, top1=0.9, rank_alignment=list(ranks), tokens=tokens
    )


def test_to_dict_roundtrip_is_json():
    m = compute_metrics(*_tensors(HAND3_PRED, HAND3_TRUE, HAND3_W))
    d = json.loads(json.dumps(m.to_dict()))
    assert set(d) == {"recall", "weighted_recall", "exact_match", "top1", "rank_alignment", "tokens"}
    assert RoutingMetrics.from_dict(d) == m
    with pytest.raises(ValueError, match="missing"):
        RoutingMetrics.from_dict({"recall": 1.0})


def test_mean_over_layers():
    s = mean_over_layers({0: _rm(0.5, 10, (1.0, 0.0)), 1: _rm(0.75, 20, (0.5, 0.5)), 2: _rm(1.0, 30, (0.0, 1.0))})
    assert s.recall == pytest.approx(0.75)
    assert s.weighted_recall == pytest.approx(0.80)
    assert s.exact_match == pytest.approx(0.375)
    assert s.top1 == pytest.approx(0.9)
    assert s.rank_alignment == pytest.approx([0.5, 0.5])
    assert s.tokens == 60
    with pytest.raises(ValueError, match="no layers"):
        mean_over_layers({})
    with pytest.raises(ValueError, match="disagree on k"):
        mean_over_layers({0: _rm(0.5, ranks=(1.0,)), 1: _rm(0.5)})


def test_per_layer_table():
    results = {
        "router": {0: _rm(0.5), 1: _rm(0.75), 2: _rm(1.0)},
        "estimator": {0: _rm(0.9), 2: _rm(0.8)},  # layer 1 missing
    }
    table = per_layer_table(results)
    lines = table.splitlines()
    assert lines[0] == "recall per layer"
    assert lines[1].split() == ["layer", "router", "estimator"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[3:] if not ln.startswith("-")}
    assert rows["0"] == ["0.5000", "0.9000"]
    assert rows["1"] == ["0.7500", "-"]
    assert rows["2"] == ["1.0000", "0.8000"]
    assert rows["mean"] == ["0.7500", "0.8500"]
    assert list(rows) == ["0", "1", "2", "mean"]
    # the mean row agrees with mean_over_layers
    assert float(rows["mean"][0]) == pytest.approx(mean_over_layers(results["router"]).recall, abs=5e-5)

    ranks = per_layer_table(results, metric="rank_alignment[1]", precision=2).splitlines()
    assert ranks[3].split() == ["0", "0.25", "0.25"]
    tokens = per_layer_table(results, metric="tokens").splitlines()
    assert tokens[3].split() == ["0", "100", "100"]
    assert per_layer_table(results, metric="hit_rate").splitlines()[1:] == lines[1:]
    with pytest.raises(ValueError, match="unknown metric"):
        per_layer_table(results, metric="precision")
    with pytest.raises(ValueError, match="out of range"):
        per_layer_table(results, metric="rank_alignment[5]")


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_shape_mismatch_raises():
    p, t, w = _tensors(HAND3_PRED, HAND3_TRUE, HAND3_W)
    with pytest.raises(ValueError, match=r"shape mismatch: pred_ids has shape \(4, 2\) but true_ids has shape \(4, 3\)"):
        recall_at_k(p[:, :2], t)
    with pytest.raises(ValueError, match="shape mismatch"):
        compute_metrics(p[:3], t, w)
    with pytest.raises(ValueError, match="shape mismatch: true_ids .* true_weights"):
        weighted_recall(p, t, w[:, :2])
    with pytest.raises(ValueError, match="shape mismatch"):
        MetricAccumulator().update(p, t, w[:2])
    with pytest.raises(ValueError, match="shape mismatch: pred_ids has 3 tokens"):
        hits_per_token(p[:3], t)
    with pytest.raises(ValueError, match=r"shape \[N, k\]"):
        exact_match(p[0], t[0])


def test_bad_dtypes_and_values_raise():
    p, t, w = _tensors(HAND3_PRED, HAND3_TRUE, HAND3_W)
    with pytest.raises(ValueError, match="integer expert ids"):
        recall_at_k(p.float(), t)
    with pytest.raises(ValueError, match="floating-point"):
        top1_hit(p, t, w.long())
    dup = p.clone()
    dup[2, 1] = dup[2, 0]
    with pytest.raises(ValueError, match="repeats an expert id.*row 2"):
        compute_metrics(dup, t, w)
    with pytest.raises(ValueError, match="negative expert ids"):
        recall_at_k(p - 5, t)
    bad = w.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        weighted_recall(p, t, bad)
    with pytest.raises(ValueError, match="negative weights"):
        rank_alignment(p, t, -w)
    with pytest.raises(ValueError, match="zero tokens"):
        recall_at_k(p[:0], t[:0])
    with pytest.raises(ValueError, match="k must be"):
        topk_from_logits(torch.randn(3, 4), 5)


def test_accumulator_misuse_raises():
    p, t, w = _tensors(HAND3_PRED, HAND3_TRUE, HAND3_W)
    acc = MetricAccumulator().update(p, t, w)
    p2, t2, w2 = _tensors(HAND2_PRED, HAND2_TRUE, HAND2_W)
    with pytest.raises(ValueError, match="k=3.*k=2"):
        acc.update(p2, t2, w2)
    with pytest.raises(ValueError, match="k=3"):
        acc.merge(MetricAccumulator().update(p2, t2, w2))
    with pytest.raises(ValueError, match="no state"):
        MetricAccumulator().state_tensor()
    with pytest.raises(ValueError, match="integer"):
        MetricAccumulator.from_state_tensor(torch.zeros(8))
    with pytest.raises(ValueError, match="length 5 \\+ k"):
        MetricAccumulator.from_state_tensor(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="zero tokens"):
        MetricAccumulator(k=3).compute()


# --------------------------------------------------------------------------- #
# Accelerator path (tie handling without host sync) must match CPU
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
@pytest.mark.parametrize("case", RANDOM_CASES)
def test_cuda_matches_cpu(case):
    pred, true, w = random_routing(**case)
    cpu = compute_metrics(pred, true, w)
    dev = torch.device("cuda")
    assert compute_metrics(pred.to(dev), true.to(dev), w.to(dev)) == cpu
    acc = MetricAccumulator(k=4, device=dev)
    for a in range(0, 500, 123):
        acc.update(pred[a : a + 123].to(dev), true[a : a + 123].to(dev), w[a : a + 123].to(dev), validate=False)
    assert acc.compute() == cpu
    assert torch.equal(hits_per_token(pred.to(dev), true.to(dev)).cpu(), hits_per_token(pred, true))
