"""Score predictors on trace data with the shared metrics module.

Per target layer and predictor: RoutingMetrics (recall@k, weighted recall, exact
match, top-1, rank alignment), counted by estimators.metrics so that the numbers
match training, reports and the runtime. The source layer's routing fed to the
predictors is the TRUE one from the trace (teacher forcing): per-layer numbers,
as in the paper's per-layer hit-rate figure, not the chained runtime.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import batch_source_state
from .metrics import MetricAccumulator, RoutingMetrics
from .predictors import KINDS, PREDICTORS, Estimator

__all__ = ["distill_kl", "evaluate", "compose_hybrid", "choose_hybrid"]


def distill_kl(true_logits: Tensor, pred_logits: Tensor, reduction: str = "mean") -> Tensor:
    """KL(softmax(true) || softmax(pred)) per token, averaged ("mean") or summed ("sum")."""
    log_p = F.log_softmax(true_logits.float(), dim=-1)
    log_q = F.log_softmax(pred_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" else kl.mean()


@torch.no_grad()
def evaluate(estimator: Estimator, batches: Iterable[Mapping[str, Tensor]],
             predictors: Iterable[str] = ("current", "quasi", "learned", "previous"),
             device: torch.device | str | None = None) -> tuple[dict[str, dict[int, RoutingMetrics]],
                                                                dict[str, dict[int, float]]]:
    """(metrics[predictor][target], mean KL[predictor][target]) over every batch.

    `predictors` may hold current / quasi / learned / previous (hybrid is composed
    afterwards with compose_hybrid; `previous` skips each sequence's first token
    and has no KL)."""
    predictors = [p for p in predictors if p != "hybrid"]
    device = torch.device(device) if device is not None else estimator.device
    kinds = [p for p in predictors if p in KINDS]
    accs = {p: {t: MetricAccumulator(k=estimator.top_k, device=device) for t in estimator.targets}
            for p in predictors}
    kl_sum = {p: {t: torch.zeros((), dtype=torch.float64, device=device) for t in estimator.targets} for p in kinds}
    kl_n = {t: 0 for t in estimator.targets}
    previous = estimator.predictor("previous") if "previous" in predictors else None
    was_training = estimator.training
    estimator.eval()
    try:
        for batch in batches:
            for p, (_, t) in enumerate(estimator.pairs):
                state = batch_source_state(batch, p, device)
                true_ids = batch["tgt_ids"][:, p].to(device)
                true_w = batch["tgt_weights"][:, p].to(device)
                if kinds:
                    true_logits = batch["tgt_logits"][:, p].to(device)
                    for kind, z in estimator.all_logits(t, state, kinds).items():
                        ids, _ = estimator.route(t, z)
                        accs[kind][t].update(ids, true_ids, true_w, validate=False)
                        kl_sum[kind][t] += distill_kl(true_logits, z, "sum").double()
                    kl_n[t] += true_ids.shape[0]
                if previous is not None:
                    has = batch["has_prev"].to(device)
                    if bool(has.any()):
                        sub = type(state)(residual=state.residual[has], previous_ids=state.previous_ids[has],
                                          previous_weights=state.previous_weights[has])
                        ids, _ = previous.predict(t, sub)
                        accs["previous"][t].update(ids, true_ids[has], true_w[has], validate=False)
    finally:
        estimator.train(was_training)
    metrics = {p: {t: acc.compute() for t, acc in per.items() if acc.tokens} for p, per in accs.items()}
    kl = {p: {t: float(kl_sum[p][t]) / max(1, kl_n[t]) for t in estimator.targets} for p in kinds}
    return metrics, kl


def choose_hybrid(validation: Mapping[str, Mapping[int, RoutingMetrics]]) -> dict[int, str]:
    """Per target layer: 'learned' where it validated strictly better than 'quasi', else 'quasi'."""
    quasi, learned = validation["quasi"], validation["learned"]
    return {t: ("learned" if learned[t].recall > quasi[t].recall else "quasi") for t in quasi}


def compose_hybrid(results: Mapping[str, Mapping[int, RoutingMetrics]], choice: Mapping[int, str]) -> dict[int, RoutingMetrics]:
    """Metrics of the hybrid predictor: per layer those of the kind it chose there."""
    return {t: results[kind][t] for t, kind in choice.items() if t in results.get(kind, {})}


def order_predictors(names: Iterable[str]) -> list[str]:
    names = list(names)
    return [p for p in PREDICTORS if p in names] + [p for p in names if p not in PREDICTORS]
