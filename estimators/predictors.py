"""Predictors of a later layer's routing from an earlier layer's state, behind one interface.

An `Estimator` holds, for every (source layer l, target layer t = l + h) pair of a
model, what prediction needs: fp32 copies of the pre-MoE norms of l and t and of
t's router, the default vectors D_l, optionally the shared expert of l, and (for
the `learned` kind) a small correction MLP per target layer. Layers are decoder
layer indices (as in traces); "h layers later" counts MoE layers only.

Every predictor maps a `SourceState` (what the runtime has in hand at layer l) to
logits over the experts of t and, through the family's exact `route`, to top-k ids
and weights (sorted by weight, descending):

    current   router_t(s_l)                      s_l = LN_l(r_l)
    quasi     router_t(q_l)                      q_l = LN_t(r_l + d_l [+ shared_l(s_l)])  (Router-PF)
    learned   router_t(q_l) + correction_t(x_l)  x_l = [q_l, m_l?, s_l?]; correction's last layer starts at zero
    hybrid    quasi or learned per target layer, whichever validated better
    deployed  the per-target kinds stored with the estimator (what a checkpoint ships)
    previous  the ids layer t used for the previous token of the same sequence (reference)

    est = load_estimator("checkpoints/demo", model)           # estimators.checkpoint
    ids, w = est.predict(t, SourceState(residual=r, ids=ids_l, weights=g_l))
    ids = est.predictor("quasi").predict_ids(t, state)

The correction net reads x_l = [q_l] plus, with `routing_features`, m_l = the source
layer's routing as a weighted multi-hot vector over its E experts (g_{l,e} at the ids,
0 elsewhere, normalised per token to sum 1), and, with `normed_features`, s_l. Both are
in hand at layer l in the runtime (the true or the predicted routing of l).

Everything runs on whatever device the estimator was moved to, one token or many
at a time, in float32 (the correction MLP may run under autocast; its output is
added in float32).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from specmoe.errors import SpecmoeError
from specmoe.families import SharedExpert  # noqa: F401  (re-exported)

from .quasi import default_mix, dense_weights, fp32_region, moe_input, quasi_state

__all__ = [
    "KINDS", "PREDICTORS", "SourceState", "CorrectionNet", "SharedExpert", "Estimator", "Predictor",
    "collect_parts", "correction_parameter_count", "expert_parameter_count", "layer_pairs", "routing_vector",
    "predict_target", "target_logits",
]

KINDS = ("current", "quasi", "learned")                 # what a target layer can deploy
PREDICTORS = ("current", "quasi", "learned", "hybrid", "previous")   # what reports compare
_VIEWS = KINDS + ("hybrid", "deployed", "previous")

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


@dataclass
class SourceState:
    """What is known at source layer l about a batch of tokens ([T, ...] each).

    residual  r_l, the residual after attention (input of LN_moe_l)
    ids, weights  the routing of layer l (the true one, or the one predicted for it)
    normed    s_l = LN_moe_l(r_l) if the caller already has it (else computed)
    shared    shared_l(s_l) if the caller already has it (only used with add_shared)
    previous_ids, previous_weights  the TARGET layer's routing for the previous token
              of the same sequence (only the `previous` predictor reads them)
    """

    residual: Tensor
    ids: Tensor | None = None
    weights: Tensor | None = None
    normed: Tensor | None = None
    shared: Tensor | None = None
    previous_ids: Tensor | None = None
    previous_weights: Tensor | None = None


def layer_pairs(moe_layers: Iterable[int], available: Iterable[int], lookahead: int) -> list[tuple[int, int]]:
    """(source, target) decoder-layer pairs, target = the MoE layer `lookahead` MoE layers
    after source, keeping pairs whose both ends are in `available`."""
    if lookahead < 1:
        raise SpecmoeError(f"lookahead must be at least 1 (got {lookahead})")
    moe = sorted(int(l) for l in moe_layers)
    have = {int(l) for l in available}
    return [(moe[i], moe[i + lookahead]) for i in range(len(moe) - lookahead)
            if moe[i] in have and moe[i + lookahead] in have]


def routing_vector(ids: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """m [T, E] float32: the combine weights at the routed ids, 0 elsewhere, scaled per token
    to sum 1 (a token whose weights sum to 0 gets the all-zero vector)."""
    dense = dense_weights(ids, weights, num_experts)
    total = dense.sum(dim=-1, keepdim=True)
    return dense / torch.where(total > 0, total, torch.ones_like(total))


class CorrectionNet(nn.Sequential):
    """features [T, in_features] -> logit correction [T, E]; the last layer starts at exactly zero."""

    def __init__(self, in_features: int, experts: int, width: int, depth: int = 1, activation: str = "silu"):
        if activation not in _ACTIVATIONS:
            raise SpecmoeError(f"unknown activation {activation!r}; use one of {', '.join(_ACTIVATIONS)}")
        layers: list[nn.Module] = []
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, width), _ACTIVATIONS[activation]()]
            size = width
        last = nn.Linear(size, experts)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


def _frozen_fp32(module: nn.Module) -> nn.Module:
    """An fp32 copy of `module` with frozen parameters: the estimator owns it, so moving or
    casting the estimator never moves or casts the model's own modules."""
    dup = copy.deepcopy(module).float()
    if any(hasattr(m, "_hf_hook") for m in dup.modules()):
        # A model spread over devices (device_map) carries accelerate's hooks, which would move
        # the copy's inputs to the original's device while its weights sit on the estimator's.
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(dup, recurse=True)
    for p in dup.parameters():
        p.requires_grad_(False)
    return dup.eval()


def correction_parameter_count(in_features: int, experts: int, width: int, depth: int = 1) -> int:
    """Parameters of one CorrectionNet (weights and biases)."""
    size, total = int(in_features), 0
    for _ in range(depth):
        total += (size + 1) * width
        size = width
    return total + (size + 1) * experts


def collect_parts(model: nn.Module, family, pairs: list[tuple[int, int]],
                  add_shared: bool = False) -> dict[str, dict[int, nn.Module]]:
    """The model modules prediction needs, as fp32 frozen copies the estimator owns: the
    norms of every source and target layer, every target router and, with `add_shared`, the
    shared expert (and its gate) of every source layer. The routed experts are never read,
    so a model whose experts are not materialised (meta tensors) serves as well."""
    sources = sorted({s for s, _ in pairs})
    targets = sorted({t for _, t in pairs})
    parts: dict[str, dict[int, nn.Module]] = {
        "norms": {l: _frozen_fp32(family.moe_norm(model, l)) for l in sorted(set(sources) | set(targets))},
        "routers": {t: _frozen_fp32(family.router(model, t)) for t in targets},
        "shared": {},
    }
    if add_shared:
        if family.shared_attr is None:
            raise SpecmoeError(f"add_shared is set but the {family.name} family has no shared expert")
        for s in sources:
            shared = family.shared_expert(model, s)
            if shared is None:
                raise SpecmoeError(f"add_shared is set but MoE layer {s} of this model has no shared expert")
            parts["shared"][s] = _frozen_fp32(shared)
    return parts


def expert_parameter_count(model: nn.Module, family) -> int:
    """Parameters of the routed experts of every MoE layer (what an offloading runtime moves)."""
    spec = family.spec(model)
    return sum(p.numel() for l in spec.moe_layers for p in family.experts(model, l).parameters())


class Estimator(nn.Module):
    """All predictors of one model and lookahead; see the module docstring."""

    def __init__(
        self,
        family,
        *,
        pairs: list[tuple[int, int]],
        default_vectors: Mapping[int, Tensor],
        parts: Mapping[str, Mapping[int, nn.Module]],
        num_experts: int,
        top_k: int,
        hidden_size: int,
        lookahead: int,
        width: int = 64,
        depth: int = 1,
        activation: str = "silu",
        add_shared: bool = False,
        routing_features: bool = False,
        normed_features: bool = False,
        learned: bool = True,
        kinds: Mapping[int, str] | None = None,
        hybrid: Mapping[int, str] | None = None,
        meta: Mapping | None = None,
    ):
        super().__init__()
        if not pairs:
            raise SpecmoeError("an estimator needs at least one (source, target) layer pair")
        self.family = family
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self._source_of = {t: s for s, t in self.pairs}
        self._target_of = {s: t for s, t in self.pairs}
        self.num_experts, self.top_k, self.hidden_size = int(num_experts), int(top_k), int(hidden_size)
        self.lookahead = int(lookahead)
        self.width, self.depth, self.activation = int(width), int(depth), activation
        self.add_shared = bool(add_shared)
        self.routing_features, self.normed_features = bool(routing_features), bool(normed_features)
        self.meta = dict(meta or {})

        self.norms = nn.ModuleDict({str(l): m for l, m in parts["norms"].items()})
        self.routers = nn.ModuleDict({str(t): m for t, m in parts["routers"].items()})
        self.shared = nn.ModuleDict({str(s): m for s, m in (parts.get("shared") or {}).items()})
        for s, t in self.pairs:
            for what, table, layer in (("norm", self.norms, s), ("norm", self.norms, t), ("router", self.routers, t)):
                if str(layer) not in table:
                    raise SpecmoeError(f"estimator parts lack the {what} of layer {layer}")
            if self.add_shared and str(s) not in self.shared:
                raise SpecmoeError(f"add_shared is set but the shared expert of layer {s} is missing")
            D = default_vectors.get(s)
            if D is None:
                raise SpecmoeError(f"no default vectors for source layer {s}")
            if tuple(D.shape) != (self.num_experts, self.hidden_size):
                raise SpecmoeError(
                    f"default vectors of layer {s} have shape {tuple(D.shape)}, "
                    f"expected ({self.num_experts}, {self.hidden_size})")
            self.register_buffer(f"default_vectors_{s}", D.detach().float().clone())

        self.corrections = nn.ModuleDict()
        if learned:
            for _, t in self.pairs:
                self.corrections[str(t)] = CorrectionNet(self.correction_inputs, self.num_experts, self.width,
                                                         self.depth, self.activation)
        default_kind = "learned" if learned else "quasi"
        self.kinds: dict[int, str] = {t: default_kind for t in self.targets}
        if kinds is not None:
            self.set_kinds(kinds)
        self.hybrid: dict[int, str] | None = None
        if hybrid is not None:
            self.hybrid = self._checked_kinds(hybrid, "hybrid")

    # ------------------------------------------------------------------ layout

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.pairs]

    @property
    def sources(self) -> list[int]:
        return [s for s, _ in self.pairs]

    def source_of(self, target: int) -> int:
        if target not in self._source_of:
            raise SpecmoeError(f"layer {target} is not a target of this estimator (targets: {self.targets})")
        return self._source_of[target]

    def target_of(self, source: int) -> int | None:
        """The layer predicted from `source`, or None (the last layers have no target)."""
        return self._target_of.get(source)

    def default_vectors(self, source: int) -> Tensor:
        return getattr(self, f"default_vectors_{source}")

    def _checked_kinds(self, kinds: Mapping[int, str], what: str) -> dict[int, str]:
        out = {int(t): str(k) for t, k in kinds.items()}
        if set(out) != set(self.targets):
            raise SpecmoeError(f"{what} kinds cover layers {sorted(out)}, the estimator's targets are {self.targets}")
        for t, k in out.items():
            if k not in KINDS:
                raise SpecmoeError(f"{what} kind {k!r} of layer {t} is not one of {', '.join(KINDS)}")
            if k == "learned" and str(t) not in self.corrections:
                raise SpecmoeError(f"layer {t} is set to 'learned' but the estimator has no correction net for it")
        return out

    def set_kinds(self, kinds: Mapping[int, str]) -> None:
        self.kinds = self._checked_kinds(kinds, "deployed")

    @property
    def correction_inputs(self) -> int:
        """Input width of every correction net: H (q_l) [+ E (m_l)] [+ H (s_l)]."""
        return (self.hidden_size + (self.num_experts if self.routing_features else 0)
                + (self.hidden_size if self.normed_features else 0))

    @property
    def device(self) -> torch.device:
        return self.default_vectors(self.sources[0]).device

    # ------------------------------------------------------------------ states

    def target_parts(self, target: int) -> dict:
        """What predicting `target` reads, as keyword arguments of `target_logits` and
        `predict_target`: that layer's modules and tensors, and the estimator's feature flags."""
        source = self.source_of(target)
        return {"source_norm": self.norms[str(source)], "target_norm": self.norms[str(target)],
                "router": self.routers[str(target)], "default_vectors": self.default_vectors(source),
                "shared": self.shared[str(source)] if self.add_shared else None,
                "correction": self.corrections[str(target)] if str(target) in self.corrections else None,
                "routing_features": self.routing_features, "normed_features": self.normed_features}

    def normed(self, target: int, state: SourceState) -> Tensor:
        """s_l = LN_moe_l(r_l) of the source layer of `target`, fp32 [T, H]."""
        return _normed(self.norms[str(self.source_of(target))], state, self.hidden_size)

    def quasi(self, target: int, state: SourceState, normed: Tensor | None = None) -> Tensor:
        """q_l = LN_moe_target(r_l + d_l [+ shared_l(s_l)]), fp32 [T, H]."""
        parts = self.target_parts(target)
        return _quasi(parts["target_norm"], parts["default_vectors"], parts["shared"], parts["source_norm"], state,
                      normed)

    def router_logits(self, target: int, x: Tensor) -> Tensor:
        """router_target applied to x [T, H], fp32 [T, E]."""
        return _router_logits(self.family, self.routers[str(target)], x)

    def correction_features(self, target: int, q: Tensor, state: SourceState | None = None,
                            normed: Tensor | None = None) -> Tensor:
        """x_l = [q_l, m_l (routing_features), s_l (normed_features)], fp32 [T, correction_inputs]."""
        return _correction_features(q, state, normed, self.routing_features, self.normed_features,
                                    self.norms[str(self.source_of(target))], self.num_experts)

    def correction(self, target: int, q: Tensor, state: SourceState | None = None,
                   normed: Tensor | None = None) -> Tensor:
        """correction_target(x_l) as fp32 [T, E]; `state` (and optionally s_l as `normed`) is
        needed when the net reads routing or s_l features."""
        net = self.corrections[str(target)] if str(target) in self.corrections else None
        if net is None:
            raise SpecmoeError(f"the estimator has no correction net for layer {target} (no 'learned' predictor)")
        return net(self.correction_features(target, q, state, normed)).float()

    # ------------------------------------------------------------------ logits

    def all_logits(self, target: int, state: SourceState, kinds: Iterable[str]) -> dict[str, Tensor]:
        """Logits of several kinds at once, sharing s_l and q_l."""
        return _logits_of_kinds(self.family, list(kinds), state, **self.target_parts(target))

    def logits(self, target: int, state: SourceState, kind: str | None = None) -> Tensor:
        kind = self.kinds[target] if kind is None else kind
        return self.all_logits(target, state, [kind])[kind]

    # ----------------------------------------------------------------- routing

    def route(self, target: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The family's exact routing of `logits` at layer `target`: (ids [T, k] long,
        weights [T, k]) ordered by weight, descending."""
        return _route(self.family, self.routers[str(target)], logits)

    def predict(self, target: int, state: SourceState, kind: str | None = None) -> tuple[Tensor, Tensor]:
        kind = self.kinds[target] if kind is None else kind
        return self.route(target, self.logits(target, state, kind))

    def predict_ids(self, target: int, state: SourceState, kind: str | None = None) -> Tensor:
        return self.predict(target, state, kind)[0]

    def predictor(self, kind: str = "deployed") -> "Predictor":
        return Predictor(self, kind)

    # ------------------------------------------------------------------ sizes

    def parameter_counts(self) -> dict[str, int]:
        """Estimator-owned numbers: correction-net parameters and default-vector entries
        (norms and routers are the model's own and not counted)."""
        corr = sum(p.numel() for p in self.corrections.parameters())
        dv = sum(self.default_vectors(s).numel() for s in self.sources)
        return {"correction": int(corr), "default_vectors": int(dv), "total": int(corr + dv)}


# ---------------------------------------------------------------------- one target from its parts
# Each step is a function of the modules and tensors it reads, so the Estimator's methods and a
# caller holding a target's parts (Estimator.target_parts) run one implementation; compiled
# once, `predict_target` then serves every layer, the parts being its inputs.


def target_logits(family, kind: str, state: SourceState, **parts) -> Tensor:
    """Logits [T, E] (fp32) of one concrete kind (current, quasi or learned) at the layer
    whose `parts` (Estimator.target_parts) are given: what Estimator.logits computes."""
    return _logits_of_kinds(family, [kind], state, **parts)[kind]


def predict_target(family, kind: str, state: SourceState, **parts) -> tuple[Tensor, Tensor]:
    """(ids [T, k] long, weights [T, k]) by weight, descending: what Estimator.predict gives."""
    return _route(family, parts["router"], target_logits(family, kind, state, **parts))


def _logits_of_kinds(family, kinds: list[str], state: SourceState, *, source_norm, target_norm, router,
                     default_vectors, shared=None, correction=None, routing_features=False,
                     normed_features=False) -> dict[str, Tensor]:
    hidden = default_vectors.shape[1]
    out: dict[str, Tensor] = {}
    need_s = "current" in kinds or shared is not None or (normed_features and "learned" in kinds)
    s = _normed(source_norm, state, hidden) if need_s else None
    q = None
    for kind in kinds:
        if kind == "current":
            out[kind] = _router_logits(family, router, s)
        elif kind in ("quasi", "learned"):
            if q is None:
                q = _quasi(target_norm, default_vectors, shared, source_norm, state, s)
            if "quasi" not in out:
                out["quasi"] = _router_logits(family, router, q)
            if kind == "learned":
                if correction is None:
                    raise SpecmoeError("the 'learned' predictor needs the target layer's correction net, and the "
                                       "estimator has none for it")
                x = _correction_features(q, state, s, routing_features, normed_features, source_norm,
                                         default_vectors.shape[0])
                out[kind] = out["quasi"] + correction(x).float()
        else:
            raise SpecmoeError(f"unknown predictor kind {kind!r}; kinds are {', '.join(KINDS)}")
    return {k: out[k] for k in kinds}


def _normed(source_norm: nn.Module, state: SourceState, hidden: int) -> Tensor:
    if state.normed is not None:
        return state.normed.reshape(-1, hidden).float()
    return moe_input(source_norm, state.residual)


def _quasi(target_norm: nn.Module, default_vectors: Tensor, shared: nn.Module | None, source_norm: nn.Module,
           state: SourceState, normed: Tensor | None) -> Tensor:
    if state.ids is None or state.weights is None:
        raise SpecmoeError("the quasi-hidden state needs the source layer's routing (ids and weights)")
    mix = default_mix(default_vectors, state.ids, state.weights)
    extra = None
    if shared is not None:
        extra = state.shared
        if extra is None:
            s = _normed(source_norm, state, default_vectors.shape[1]) if normed is None else normed
            with fp32_region(s.device):
                extra = shared(s).float()
    return quasi_state(target_norm, state.residual, mix, extra)


def _router_logits(family, router: nn.Module, x: Tensor) -> Tensor:
    with fp32_region(x.device):
        return family.router_logits(router, x.float()).float()


def _correction_features(q: Tensor, state: SourceState | None, normed: Tensor | None, routing_features: bool,
                         normed_features: bool, source_norm: nn.Module, num_experts: int) -> Tensor:
    feats = [q.float()]
    if routing_features:
        if state is None or state.ids is None or state.weights is None:
            raise SpecmoeError("routing_features needs the source layer's routing (ids and weights)")
        feats.append(routing_vector(state.ids, state.weights, num_experts).to(q.device))
    if normed_features:
        if normed is None:
            if state is None:
                raise SpecmoeError("normed_features needs the source state (s_l or r_l)")
            normed = _normed(source_norm, state, q.shape[-1])
        feats.append(normed.float())
    return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)


def _route(family, router: nn.Module, logits: Tensor) -> tuple[Tensor, Tensor]:
    ids, weights = family.route(router, logits)
    return _sorted_by_weight(ids, weights)


def _sorted_by_weight(ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    order = torch.argsort(weights, dim=-1, descending=True, stable=True)
    return ids.long().gather(-1, order), weights.gather(-1, order)


class Predictor:
    """One predictor kind of an Estimator: logits / predict / predict_ids per target layer."""

    def __init__(self, estimator: Estimator, kind: str):
        if kind not in _VIEWS:
            raise SpecmoeError(f"unknown predictor {kind!r}; choose one of {', '.join(_VIEWS)}")
        if kind == "learned" and not len(estimator.corrections):
            raise SpecmoeError("this estimator has no learned correction nets")
        self.estimator, self.kind = estimator, kind

    def __repr__(self) -> str:
        return f"Predictor({self.kind!r}, targets={self.estimator.targets})"

    def kind_of(self, target: int) -> str:
        """The concrete kind used at `target` (hybrid and deployed resolve per layer)."""
        if self.kind == "deployed":
            return self.estimator.kinds[target]
        if self.kind == "hybrid":
            if self.estimator.hybrid is None:
                raise SpecmoeError("this estimator has no hybrid selection (it was not trained with --predictor all)")
            return self.estimator.hybrid[target]
        return self.kind

    def logits(self, target: int, state: SourceState) -> Tensor:
        if self.kind == "previous":
            ids, weights = _previous(state)
            dense = dense_weights(ids, weights, self.estimator.num_experts)
            return torch.where(dense > 0, dense.log(), torch.full_like(dense, float("-inf")))
        return self.estimator.logits(target, state, self.kind_of(target))

    def predict(self, target: int, state: SourceState) -> tuple[Tensor, Tensor]:
        if self.kind == "previous":
            ids, weights = _previous(state)
            return _sorted_by_weight(ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, weights.shape[-1]).float())
        return self.estimator.predict(target, state, self.kind_of(target))

    def predict_ids(self, target: int, state: SourceState) -> Tensor:
        return self.predict(target, state)[0]

    def target_parts(self, target: int) -> tuple[str, dict] | None:
        """(the concrete kind at `target`, its parts): predict_target(family, kind, state, **parts)
        then predicts what `predict` does. None for `previous`, which reads no parts."""
        if self.kind == "previous":
            return None
        return self.kind_of(target), self.estimator.target_parts(target)


def _previous(state: SourceState) -> tuple[Tensor, Tensor]:
    if state.previous_ids is None or state.previous_weights is None:
        raise SpecmoeError("the 'previous' predictor needs the target layer's routing of the previous token")
    return state.previous_ids, state.previous_weights
