"""What the runtime asks at MoE layer l: which experts will layer l+h use?

`--prefetch` picks the answer:

    none      nothing is predicted; experts are copied when the true router asks (on demand)
    current   router_{l+h}(s_l)                 the older baseline
    quasi     router_{l+h}(q_l)                 the paper's Router-PF (default vectors needed)
    learned   router_{l+h}(q_l) + correction     the paper's Est-PF (an estimator checkpoint)
    hybrid    quasi or learned per layer         the paper's Hybrid-PF (an estimator checkpoint)
    oracle    the true routing of l+h, recorded by an exact pass over the same tokens (a ceiling),
              optionally thinned to a set hit rate

All but `oracle` go through the estimators stage's public predictor API, so the
runtime predicts exactly what `train` measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specmoe.errors import SpecmoeError

MODES = ("none", "current", "quasi", "learned", "hybrid", "oracle")


class RuntimePredictor:
    """predict(target, residual, normed, ids, weights, position) -> (ids [T, k], weights [T, k])."""

    lookahead: int = 1

    def target_of(self, layer: int) -> int | None:
        raise NotImplementedError

    def predict(self, target: int, residual, normed, ids, weights, position: int):
        raise NotImplementedError


class EstimatorPredictor(RuntimePredictor):
    def __init__(self, estimator, kind: str):
        from estimators import SourceState

        self._state = SourceState
        self.estimator = estimator
        self.lookahead = estimator.lookahead
        if kind == "hybrid" and estimator.hybrid is None:
            kind = "deployed"
        self.predictor = estimator.predictor(kind)
        self.kind = kind

    def target_of(self, layer):
        return self.estimator.target_of(layer)

    def predict(self, target, residual, normed, ids, weights, position):
        state = self._state(residual=residual, ids=ids, weights=weights, normed=normed)
        return self.predictor.predict(target, state)

    def target_parts(self, target) -> tuple[str, dict] | None:
        """(kind, parts) for estimators.predict_target: the prediction as a function of its
        modules and tensors, which a compiled decode piece traces once for every layer."""
        return self.predictor.target_parts(target)


@dataclass
class RecordedRouting:
    """True routing per (position, layer) from an exact pass: what `oracle` replays."""

    ids: dict[tuple[int, int], torch.Tensor]
    weights: dict[tuple[int, int], torch.Tensor]


class OraclePredictor(RuntimePredictor):
    """The true routing of the target layer at the same position; with hit_rate p < 1 each
    predicted expert is replaced, with probability 1 - p, by an expert the token does not use.

    Every prediction is drawn once, up front, and kept on the device: a decode step's
    prediction is then a view (no kernel, no copy), so the oracle costs the step nothing
    that a real predictor would not, and every mode of a benchmark sees the same draws."""

    def __init__(self, recorded: RecordedRouting, moe_layers, num_experts: int, lookahead: int = 1,
                 hit_rate: float = 1.0, seed: int = 0):
        if not 0.0 <= hit_rate <= 1.0:
            raise SpecmoeError(f"oracle hit rate must be in [0, 1] (got {hit_rate})")
        self.recorded, self.lookahead, self.hit_rate = recorded, int(lookahead), float(hit_rate)
        self.num_experts = int(num_experts)
        moe = sorted(moe_layers)
        self._target = {moe[i]: moe[i + lookahead] for i in range(len(moe) - lookahead)}
        keys = sorted(recorded.ids)
        self._row = {key: i for i, key in enumerate(keys)}
        ids = torch.stack([recorded.ids[k] for k in keys]).long() if keys else torch.zeros((0, 1), dtype=torch.long)
        self._ids = self._thin(ids, np.random.default_rng(seed)) if hit_rate < 1.0 else ids
        self._weights = torch.stack([recorded.weights[k] for k in keys]) if keys else torch.zeros((0, 1))
        self._on: dict = {}   # device -> (ids, weights) there

    def target_of(self, layer):
        return self._target.get(layer)

    def predict(self, target, residual, normed, ids, weights, position):
        T = residual.shape[0]
        rows = []
        for p in range(position, position + T):
            row = self._row.get((p, target))
            if row is None:
                raise SpecmoeError(f"the oracle has no recorded routing for position {p}, layer {target}; "
                                   "record it with an exact pass over the same tokens first")
            rows.append(row)
        device = residual.device
        if device not in self._on:
            self._on[device] = (self._ids.to(device), self._weights.to(device))
        all_ids, all_w = self._on[device]
        if T == 1:
            return all_ids[rows[0]:rows[0] + 1], all_w[rows[0]:rows[0] + 1]
        index = torch.tensor(rows, device=device)
        return all_ids.index_select(0, index), all_w.index_select(0, index)

    def _thin(self, ids: torch.Tensor, rng) -> torch.Tensor:
        out = ids.clone()
        for t in range(ids.shape[0]):
            used = set(ids[t].tolist())
            spare = [e for e in range(self.num_experts) if e not in used]
            for j in np.flatnonzero(rng.random(ids.shape[1]) >= self.hit_rate):
                if spare:
                    out[t, j] = spare.pop(int(rng.integers(len(spare))))
        return out


def lookahead_of(config) -> int:
    """The lookahead a RuntimeConfig asks for: its own, else its estimator checkpoint's, else 1."""
    if config.lookahead is not None:
        return int(config.lookahead)
    if config.estimators:
        from estimators import read_config

        return int(read_config(config.estimators)["lookahead"])
    return 1


def build_predictor(mode: str, model, family, spec, *, estimators: str | Path | None = None,
                    default_vectors: str | Path | None = None, lookahead: int = 1,
                    recorded: RecordedRouting | None = None, oracle_hit_rate: float = 1.0,
                    device: torch.device | str = "cpu") -> RuntimePredictor | None:
    """The predictor of `mode` for `model`; clear errors for what a mode lacks."""
    if mode not in MODES:
        raise SpecmoeError(f"unknown --prefetch {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "none":
        return None
    if mode == "oracle":
        if recorded is None:
            raise SpecmoeError("--prefetch oracle needs the true routing of an exact pass over the same tokens "
                               "(infer bench records it itself)")
        return OraclePredictor(recorded, spec.moe_layers, spec.num_experts, lookahead, oracle_hit_rate)
    from estimators import load_estimator

    if estimators is not None:
        est = load_estimator(estimators, model, device=device)
        if mode == "learned" and not len(est.corrections):
            raise SpecmoeError(f"the estimator in {estimators} has no learned correction nets; use --prefetch quasi")
        return EstimatorPredictor(est, mode)
    if mode in ("learned", "hybrid"):
        raise SpecmoeError(f"--prefetch {mode} needs trained estimators: pass --estimators DIR (made by `train`)")
    return EstimatorPredictor(_router_only_estimator(model, family, spec, lookahead, default_vectors, mode, device),
                              mode)


def router_predictor(model, family, spec, kind: str, default_vectors: dict | None = None, lookahead: int = 1,
                     device="cpu") -> EstimatorPredictor:
    """`current` or `quasi` from the model's own norms and routers, with default vectors given
    as tensors {source layer: [E, H]} (zeros where None)."""
    est = _router_only_estimator(model, family, spec, lookahead, None, "current", device)
    if default_vectors is not None:
        for s, _ in est.pairs:
            est.default_vectors(s).copy_(default_vectors[s])
    est.set_kinds({t: kind for t in est.targets})
    return EstimatorPredictor(est, kind)


def _router_only_estimator(model, family, spec, lookahead, default_vectors, mode, device):
    """An estimator with no correction nets: the model's own norms and routers (plus default
    vectors for `quasi`, from a trace)."""
    from estimators import Estimator, collect_parts, layer_pairs

    pairs = layer_pairs(spec.moe_layers, spec.moe_layers, lookahead)
    if not pairs:
        raise SpecmoeError(f"lookahead {lookahead} leaves no layer to predict ({len(spec.moe_layers)} MoE layers)")
    if default_vectors is None:
        if mode == "quasi":
            raise SpecmoeError("--prefetch quasi needs default vectors: pass --estimators DIR (a `train` checkpoint) "
                               "or --default-vectors TRACE_DIR (a complete `trace`)")
        dv = {s: torch.zeros(spec.num_experts, spec.hidden_size) for s, _ in pairs}
    else:
        from tracing import TraceReader

        reader = TraceReader(default_vectors)
        table = reader.default_vectors()
        missing = [s for s, _ in pairs if s not in table]
        if missing:
            raise SpecmoeError(f"the trace {default_vectors} has no default vectors for layers {missing}")
        dv = {s: table[s] for s, _ in pairs}
    parts = collect_parts(model, family, pairs)
    est = Estimator(family, pairs=pairs, default_vectors=dv, parts=parts, num_experts=spec.num_experts,
                    top_k=spec.top_k, hidden_size=spec.hidden_size, lookahead=lookahead, learned=False,
                    kinds={t: mode for _, t in pairs})
    return est.to(device).eval()
