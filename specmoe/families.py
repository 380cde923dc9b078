"""What differs between MoE model families: one declarative description per family.

Tracing, the estimators and the runtime ask this module every "where is it" and
"how does this family route" question; nothing else in specmoe hard-codes a module
path or a routing rule. A family is a frozen `Family` record: the attribute names
that lead from a decoder layer to its MoE block, router, fused experts, pre-MoE norm
and shared expert; the config keys that size it; and a few small functions (which
layers are sparse, how the router computes its logits and turns them into ids and
weights, how one expert computes); and where its experts and other tensors sit in
safetensors checkpoints (`CheckpointLayout`, key renames). Adding a family is one more
`Family(...)` entry in `_ALL_FAMILIES`.

Everything is read off the transformers modules themselves (router attributes such
as `top_k`, `norm_topk_prob`, `e_score_correction_bias`, expert attributes such as
`act_fn`, `alpha`, `limit`), not off version checks, so one description serves
transformers 5.17 and 5.24 alike.

Notation (the README's `train` section): r_l is the residual after attention, s_l = LN_moe_l(r_l)
the router input, z_l the router logits, (I_l, g_l) the top-k ids and weights.
"""

from __future__ import annotations

import hashlib
import json
import math

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from specmoe.errors import UnsupportedModelError

__all__ = ["MoESpec", "Family", "FAMILIES", "CheckpointLayout", "detect_family", "router_fingerprint",
           "fingerprint_router_state"]

Tensor = torch.Tensor
Routing = tuple[Tensor, Tensor]  # (ids LongTensor [T, k], weights [T, k])


@dataclass(frozen=True)
class MoESpec:
    """The sizes and shape of one model's MoE stack, read from its config."""

    family: str
    model_type: str
    num_layers: int                 # decoder layers, dense ones included
    moe_layers: tuple[int, ...]     # decoder layer indices with a sparse MoE block
    num_experts: int                # routed experts per MoE layer
    top_k: int                      # experts the model really uses per token
    hidden_size: int
    expert_intermediate_size: int
    has_shared_expert: bool
    scoring: str                    # "softmax" | "sigmoid"
    max_position_embeddings: int


# --------------------------------------------------------------------------- config


def _config_of(model_or_config) -> PretrainedConfig:
    if isinstance(model_or_config, PretrainedConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if isinstance(config, PretrainedConfig):
        return config
    raise UnsupportedModelError(
        f"expected a transformers model or config, got {type(model_or_config).__name__}"
    )


# ------------------------------------------------------------ which layers are sparse


def _every_layer(config) -> tuple[int, ...]:
    return tuple(range(config.num_hidden_layers))


def _qwen_sparse_layers(config) -> tuple[int, ...]:
    # Qwen2/3-MoE: mlp_only_layers wins; otherwise every decoder_sparse_step-th layer.
    dense = set(getattr(config, "mlp_only_layers", None) or ())
    step = getattr(config, "decoder_sparse_step", 1) or 1
    if (config.num_experts or 0) <= 0:
        return ()
    return tuple(
        i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0
    )


def _after_first_k_dense(config) -> tuple[int, ...]:
    # DeepSeek / GLM: the first `first_k_dense_replace` layers keep a dense MLP.
    first = getattr(config, "first_k_dense_replace", 0) or 0
    return tuple(range(first, config.num_hidden_layers))


# ----------------------------------------------------------------- router logits


def _flat(s: Tensor, hidden: int) -> Tensor:
    return s.reshape(-1, hidden)


def _linear_logits(router: nn.Module, s: Tensor) -> Tensor:
    # Same dtype as the router input, as F.linear in the stock router; GPT-OSS adds a bias.
    weight = router.weight
    return F.linear(_flat(s, weight.shape[-1]), weight, getattr(router, "bias", None))


def _fp32_logits(router: nn.Module, s: Tensor) -> Tensor:
    # DeepSeek / GLM upcast both input and weight: logits are fp32 even in a bf16 model.
    weight = router.weight
    return F.linear(_flat(s, weight.shape[-1]).float(), weight.float())


# ----------------------------------------------------------------------- routing
# Each reproduces the stock router's selection op for op, including topk's `sorted`
# flag: the order of ids is what the experts module receives, and for sorted=False
# that order is only reproducible by running the same op on the same values.


def _softmax_topk(router: nn.Module, logits: Tensor) -> Routing:
    """Qwen2-MoE, Qwen3-MoE, OLMoE: softmax over all experts, top-k, optional renorm."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, router.top_k, dim=-1)
    if router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # These routers hand the experts weights in the logits' dtype.
    return ids, weights.to(logits.dtype)


def _mixtral_route(router: nn.Module, logits: Tensor) -> Routing:
    """Softmax over all experts, top-k, always renormalised; weights stay fp32."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, router.top_k, dim=-1)
    return ids, weights / weights.sum(dim=-1, keepdim=True)


def _topk_then_softmax(router: nn.Module, logits: Tensor) -> Routing:
    """GPT-OSS: top-k of the (biased) logits, softmax over those k only."""
    top, ids = torch.topk(logits, router.top_k, dim=-1)
    return ids, torch.softmax(top, dim=-1, dtype=top.dtype)


def _group_keep_mask(group_scores: Tensor, topk_group: int, experts_per_group: int) -> Tensor:
    """Boolean [T, E]: experts whose group is among the `topk_group` best groups."""
    best = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return keep.repeat_interleave(experts_per_group, dim=1)


def _deepseek_v2_route(router: nn.Module, logits: Tensor) -> Routing:
    """Softmax scores; greedy or group-limited greedy top-k; scaled, never renormalised.

    The stock DeepSeek-V2 router ignores `norm_topk_prob`; so do we."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    method = router.topk_method
    if method == "group_limited_greedy":
        groups = router.num_group
        per_group = scores.shape[-1] // groups
        group_best = scores.view(-1, groups, per_group).max(dim=-1).values
        keep = _group_keep_mask(group_best, router.topk_group, per_group)
        scores = scores.masked_fill(~keep, 0.0)
    elif method != "greedy":
        raise UnsupportedModelError(f"deepseek_v2 topk_method {method!r} is not one transformers implements")
    weights, ids = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return ids, weights * router.routed_scaling_factor


def _sigmoid_grouped_route(router: nn.Module, logits: Tensor) -> Routing:
    """DeepSeek-V3, GLM-4 MoE: sigmoid scores; selection on scores + correction bias,
    limited to the best `topk_group` groups (a group's merit is its two best experts);
    weights are the UNbiased scores of the chosen experts, optionally renormalised,
    then scaled."""
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias
    groups = router.num_group
    per_group = choice.shape[-1] // groups
    group_merit = choice.view(-1, groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    keep = _group_keep_mask(group_merit, router.topk_group, per_group)
    choice = choice.masked_fill(~keep, float("-inf"))
    ids = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, weights * router.routed_scaling_factor


def _sparsemixer_eval_route(router: nn.Module, logits: Tensor) -> Routing:
    """Phi-MoE's sparsemixer in eval mode: always two experts, whatever top_k says.

    Expert 1 is the argmax; its weight is its softmax share among the experts whose
    logit lies within a relative band 2*jitter of the max (the others are masked).
    Expert 2 is the argmax once expert 1 is removed, weighted the same way around
    the runner-up. (Training mode samples with Gumbel noise: not reproducible.)"""
    band = 2 * router.router_jitter_noise

    def pick(candidates: Tensor) -> tuple[Tensor, Tensor]:
        best, idx = candidates.max(dim=-1, keepdim=True)
        # Relative gap to the best, with |logit| floored at the best so tiny logits don't blow it up.
        gap = (best - logits) / logits.abs().clamp(min=best)
        share = torch.softmax(candidates.masked_fill(gap > band, float("-inf")), dim=-1)
        return idx, share.gather(dim=-1, index=idx)

    first, w_first = pick(logits)
    second, w_second = pick(logits.scatter(-1, first, float("-inf")))
    return torch.cat((first, second), dim=-1), torch.cat((w_first, w_second), dim=-1)


# ------------------------------------------------------------------------ experts


# An expert is a gated projection followed by a down projection,
#     a = glu(x W_gate_up (+ b_gate_up)),    y = a W_down (+ b_down),
# with `gate_up_proj` / `down_proj` (and `*_bias`) as the experts module names them. What a
# family changes is data: the weight layout (`Family.weights_in_out`: GPT-OSS stores
# [in, out], the others [out, in] as F.linear does) and the glu (`Family.glu_fn`: how gate
# and up sit in the projection and combine). The down projection is affine in a, so applied
# to a sum of n intermediates with bias n b_down it gives the sum of the n outputs.
#
# The glu functions only read non-parameter attributes of the experts module (act_fn,
# alpha, limit): the runtime keeps that module with its parameters on the meta device.

def _swiglu(experts: nn.Module, gate_up: Tensor) -> Tensor:
    """[gate; up] concatenated along the last dim: act(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _gpt_oss_glu(experts: nn.Module, gate_up: Tensor) -> Tensor:
    """Gate and up interleaved (even / odd columns); a clamped swish-GLU whose `up`
    branch is shifted by one."""
    alpha, limit = experts.alpha, experts.limit
    gate = gate_up[..., 0::2].clamp(max=limit)
    up = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


# Native kernels (the runtime's CPU experts) compute these glus themselves. Each glu
# function carries `native(experts) -> NativeGlu | None`: which one it is and its constants
# for this experts module, or None where the module does not match (another activation).
# A glu function without it is computed in torch.

@dataclass(frozen=True)
class NativeGlu:
    kind: str                  # "swiglu" (SiLU(gate) * up, halves) or "clamped_swiglu" (GPT-OSS's)
    alpha: float = 1.0
    limit: float = math.inf


def _silu_types() -> tuple[type, ...]:
    # What the families put in `act_fn` for hidden_act "silu" / "swish": transformers'
    # SiLUActivation (forward is F.silu) or torch's own.
    types: tuple[type, ...] = (nn.SiLU,)
    try:
        from transformers.activations import SiLUActivation

        types += (SiLUActivation,)
    except ImportError:
        pass
    return types


_SILU_TYPES = _silu_types()


def _swiglu_native(experts: nn.Module) -> NativeGlu | None:
    return NativeGlu("swiglu") if type(getattr(experts, "act_fn", None)) in _SILU_TYPES else None


def _gpt_oss_glu_native(experts: nn.Module) -> NativeGlu | None:
    try:
        alpha, limit = float(experts.alpha), float(experts.limit)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None
    return None if math.isnan(alpha) or math.isnan(limit) else NativeGlu("clamped_swiglu", alpha, limit)


_swiglu.native = _swiglu_native
_gpt_oss_glu.native = _gpt_oss_glu_native


# ------------------------------------------------------------------------ on disk
# Where routed experts live in safetensors checkpoints. Each in-memory per-expert tensor
# (`Family.expert_params`, shaped as `Family.expert_tensors` gives it) is read from key
# templates ({l}: decoder layer, {e}: expert), stored one of three ways:
#   per-expert  one nn.Linear matrix [out, in] per expert and key, as the families publish
#               them; several keys are stacked along `out` (gate, then up)
#   fused       one tensor per layer and key holding every expert along dim 0, already in the
#               in-memory layout (what transformers 5 holds in memory)
#   MXFP4       fused, as `<key>_blocks` uint8 [E, out, in/32, 16] (FP4 e2m1 pairs, low nibble
#               first) and `<key>_scales` uint8 [E, out, in/32] (E8M0 exponents): GPT-OSS


@dataclass(frozen=True)
class CheckpointLayout:
    """One way a family's routed experts can be stored in a checkpoint."""

    name: str                                 # "per_expert", "fused", "mxfp4"
    per_expert: bool                          # templates carry {e}; otherwise experts are dim 0
    tensors: Mapping[str, tuple[str, ...]]    # in-memory expert tensor -> its key templates
    mxfp4: frozenset[str] = frozenset()       # in-memory names stored MXFP4-quantised

    def keys(self, name: str, layer: int, expert: int = 0) -> tuple[str, ...]:
        return tuple(t.format(l=layer, e=expert) for t in self.tensors[name])


MXFP4_PARTS = ("_blocks", "_scales")


def _per_expert_swiglu(block: str, gate: str, up: str, down: str) -> CheckpointLayout:
    key = f"model.layers.{{l}}.{block}.experts.{{e}}.{{name}}.weight"
    return CheckpointLayout("per_expert", True, MappingProxyType({
        "gate_up_proj": (key.replace("{name}", gate), key.replace("{name}", up)),
        "down_proj": (key.replace("{name}", down),),
    }))


_QWEN_PER_EXPERT = _per_expert_swiglu("mlp", "gate_proj", "up_proj", "down_proj")
_MIXTRAL_PER_EXPERT = _per_expert_swiglu("block_sparse_moe", "w1", "w3", "w2")  # w1 gate, w3 up, w2 down
_GPT_OSS_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
_GPT_OSS_MXFP4 = CheckpointLayout(
    "mxfp4", False,
    MappingProxyType({n: (f"model.layers.{{l}}.mlp.experts.{n}",) for n in _GPT_OSS_PARAMS}),
    mxfp4=frozenset({"gate_up_proj", "down_proj"}),
)

# Router tensors that decide routing: fingerprint name -> attribute of the router module,
# which is also the last part of its state-dict key (how the checkpoint reader finds it).
ROUTER_STATE = MappingProxyType({"weight": "weight", "bias": "bias", "selection_bias": "e_score_correction_bias"})


# ------------------------------------------------------------------------- family


class SharedExpert(nn.Module):
    """The shared expert of one MoE block (and its sigmoid gate, where the family has one),
    lifted out of the block so it can be copied without the routed experts."""

    def __init__(self, shared: nn.Module, gate: nn.Module | None = None):
        super().__init__()
        self.shared = shared
        self.gate = gate

    def forward(self, s: Tensor) -> Tensor:
        """shared(s) [* sigmoid(gate(s))] as float32, computed in the modules' own dtype."""
        param = next(self.shared.parameters(), None)
        x = s.to(param.dtype) if param is not None else s
        out = self.shared(x).float()
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x).float()) * out
        return out

    def native(self, s: Tensor) -> Tensor:
        """The same in the modules' own dtype, rounded where the stock blocks round (gate
        and product in that dtype): what the stock block adds to its routed output."""
        param = next(self.shared.parameters(), None)
        x = s.to(param.dtype) if param is not None else s
        out = self.shared(x)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out


@dataclass(frozen=True)
class Family:
    """One MoE family, described by data. Module paths are attribute names, walked as

        model.base_model.<layers_attr>[l].<moe_attr>.<router_attr | experts_attr | shared_attr>
        model.base_model.<layers_attr>[l].<norm_attr>
    """

    name: str
    # --- where things live
    router_attr: str
    layers_attr: str = "layers"
    moe_attr: str = "mlp"
    experts_attr: str = "experts"
    norm_attr: str = "post_attention_layernorm"
    shared_attr: str | None = None
    shared_gate_attr: str | None = None         # sigmoid gate multiplying the shared expert
    # --- config keys
    num_experts_key: str = "num_experts"
    expert_size_key: str = "moe_intermediate_size"
    shared_size_key: str | None = None           # a zero/None value there means "no shared expert"
    fixed_top_k: int | None = None               # when the router ignores num_experts_per_tok
    # --- how the block calls its experts module: (hidden, ids, weights) parameter names
    experts_call: tuple[str, str, str] = ("hidden_states", "top_k_index", "top_k_weights")
    # --- behaviour
    scoring: str = "softmax"
    sparse_layers: Callable[[object], tuple[int, ...]] = _every_layer
    logits_fn: Callable[[nn.Module, Tensor], Tensor] = _linear_logits
    route_fn: Callable[[nn.Module, Tensor], Routing] = _softmax_topk
    expert_params: tuple[str, ...] = ("gate_up_proj", "down_proj")
    glu_fn: Callable[[nn.Module, Tensor], Tensor] = _swiglu   # gate_up projection [..., 2I] -> a [..., I]
    weights_in_out: bool = False                 # expert weights stored [in, out] instead of [out, in]
    model_types: tuple[str, ...] = ()            # config.model_type values; defaults to (name,)
    # --- on disk: the published expert layouts (the fused in-memory one is always accepted
    # too, see `checkpoint_layouts`) and (on disk, in memory) renames of other keys, applied
    # in order as substrings, as transformers' own conversion mapping does
    published_layouts: tuple[CheckpointLayout, ...] = (_QWEN_PER_EXPERT,)
    checkpoint_renames: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.model_types:
            object.__setattr__(self, "model_types", (self.name,))

    # ---------------------------------------------------------------- config side

    def spec(self, model_or_config) -> MoESpec:
        config = _config_of(model_or_config)
        shared = False
        if self.shared_size_key is not None:
            shared = (getattr(config, self.shared_size_key, 0) or 0) > 0
        return MoESpec(
            family=self.name,
            model_type=config.model_type,
            num_layers=int(config.num_hidden_layers),
            moe_layers=tuple(int(i) for i in self.sparse_layers(config)),
            num_experts=int(getattr(config, self.num_experts_key)),
            top_k=int(self.fixed_top_k or config.num_experts_per_tok),
            hidden_size=int(config.hidden_size),
            expert_intermediate_size=int(getattr(config, self.expert_size_key)),
            has_shared_expert=shared,
            scoring=self.scoring,
            max_position_embeddings=int(config.max_position_embeddings),
        )

    def module_paths(self, layer_idx: int, prefix: str = "model.") -> dict[str, str | None]:
        """Dotted names (as in named_modules / state dicts of a *ForCausalLM) for one layer."""
        layer = f"{prefix}{self.layers_attr}.{layer_idx}"
        moe = f"{layer}.{self.moe_attr}"
        return {
            "layer": layer,
            "moe": moe,
            "router": f"{moe}.{self.router_attr}",
            "experts": f"{moe}.{self.experts_attr}",
            "norm": f"{layer}.{self.norm_attr}",
            "shared": f"{moe}.{self.shared_attr}" if self.shared_attr else None,
            "shared_gate": f"{moe}.{self.shared_gate_attr}" if self.shared_gate_attr else None,
        }

    # ---------------------------------------------------------------- module side

    def base_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (a *ForCausalLM's inner model, or the model itself)."""
        return getattr(model, "base_model", model)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.base_model(model), self.layers_attr)

    def moe_block(self, model: nn.Module, layer_idx: int) -> nn.Module:
        block = getattr(self.decoder_layers(model)[layer_idx], self.moe_attr)
        if not (hasattr(block, self.router_attr) and hasattr(block, self.experts_attr)):
            raise ValueError(
                f"decoder layer {layer_idx} of this {self.name} model is dense "
                f"(MoE layers: {list(self.spec(model).moe_layers)})"
            )
        return block

    def router(self, model: nn.Module, layer_idx: int) -> nn.Module:
        return getattr(self.moe_block(model, layer_idx), self.router_attr)

    def experts(self, model: nn.Module, layer_idx: int) -> nn.Module:
        return getattr(self.moe_block(model, layer_idx), self.experts_attr)

    def moe_norm(self, model: nn.Module, layer_idx: int) -> nn.Module:
        return getattr(self.decoder_layers(model)[layer_idx], self.norm_attr)

    def moe_forward(self, model: nn.Module, layer_idx: int, s: Tensor) -> Tensor:
        """The stock MoE block on s (routed + shared experts), as a plain tensor.

        GPT-OSS's block also returns its router scores; they are dropped here."""
        out = self.moe_block(model, layer_idx)(s)
        return out[0] if isinstance(out, tuple) else out

    def shared_expert(self, model: nn.Module, layer_idx: int) -> "SharedExpert | None":
        """The shared expert of an MoE block with its gate, as one module that can be
        copied without the routed experts; None where the family or layer has none."""
        return self.block_shared_expert(self.moe_block(model, layer_idx))

    def block_shared_expert(self, block: nn.Module) -> "SharedExpert | None":
        """`shared_expert` of a MoE block module at hand."""
        if self.shared_attr is None:
            return None
        shared = getattr(block, self.shared_attr, None)
        if shared is None:
            return None
        gate = getattr(block, self.shared_gate_attr) if self.shared_gate_attr else None
        return SharedExpert(shared, gate)

    def shared_expert_output(self, model: nn.Module, layer_idx: int, s: Tensor) -> Tensor | None:
        module = self.shared_expert(model, layer_idx)
        return None if module is None else module(s).to(s.dtype)

    # ------------------------------------------------------------- hook helpers

    def captured_logits(self, router_output) -> Tensor:
        """Router logits out of a forward hook's `output` on the router module.

        Every supported router returns (logits, weights, ids); a bare tensor is taken as is."""
        return router_output[0] if isinstance(router_output, (tuple, list)) else router_output

    def captured_routing(self, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden [T, H], ids [T, k], weights [T, k]) out of a forward pre-hook on the
        experts module registered with with_kwargs=True: what the model really used."""
        values = list(args[:3])
        for name in self.experts_call[len(values):]:
            values.append(kwargs[name])
        hidden, ids, weights = values
        return hidden, ids, weights

    # ------------------------------------------------------------------- routing

    def router_logits(self, router: nn.Module, s: Tensor) -> Tensor:
        """z = W s (+ bias) as [T, E], in the dtype the stock router produces."""
        return self.logits_fn(router, s)

    def route(self, router: nn.Module, logits: Tensor) -> Routing:
        """(ids [T, k], weights [T, k]) exactly as the model hands them to its experts.

        Works on any logits (true or predicted); extra state (correction bias, group
        limits, scaling) comes from the router module."""
        return self.route_fn(router, logits.reshape(-1, logits.shape[-1]))

    def router_weight(self, router: nn.Module) -> Tensor:
        return router.weight.detach()

    def router_bias(self, router: nn.Module) -> Tensor | None:
        bias = getattr(router, "bias", None)
        return bias.detach() if isinstance(bias, Tensor) else None

    def selection_bias(self, router: nn.Module) -> Tensor | None:
        """The per-expert bias added only when choosing experts (DeepSeek-V3, GLM)."""
        bias = getattr(router, ROUTER_STATE["selection_bias"], None)
        return bias.detach() if isinstance(bias, Tensor) else None

    def router_state(self, router: nn.Module) -> tuple[tuple[str, Tensor | None], ...]:
        """(name, tensor or None) of every ROUTER_STATE entry, in ROUTER_STATE's order."""
        return (("weight", self.router_weight(router)), ("bias", self.router_bias(router)),
                ("selection_bias", self.selection_bias(router)))

    # ------------------------------------------------------------------- on disk

    def checkpoint_layouts(self) -> tuple[CheckpointLayout, ...]:
        """Every expert layout a checkpoint of this family may use, in detection order:
        the published ones, then the fused in-memory one."""
        prefix = f"model.{self.layers_attr}.{{l}}.{self.moe_attr}.{self.experts_attr}."
        fused = CheckpointLayout("fused", False, MappingProxyType({n: (prefix + n,) for n in self.expert_params}))
        return (*self.published_layouts, fused)

    def memory_name(self, checkpoint_key: str) -> str:
        """The *ForCausalLM state-dict name of a non-expert checkpoint key."""
        for on_disk, in_memory in self.checkpoint_renames:
            checkpoint_key = checkpoint_key.replace(on_disk, in_memory)
        return checkpoint_key

    def expert_shapes(self, spec: MoESpec) -> dict[str, tuple[int, ...]]:
        """Shape of each tensor `expert_tensors` returns, from the config alone."""
        hidden, inter = spec.hidden_size, spec.expert_intermediate_size
        out_in = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}
        shapes = {}
        for name in self.expert_params:
            weight = name.removesuffix("_bias")
            if weight != name:
                shapes[name] = out_in[weight][:1]
            else:
                shapes[name] = out_in[weight][::-1] if self.weights_in_out else out_in[weight]
        return shapes

    # ------------------------------------------------------------------- experts

    def expert_tensors(self, experts: nn.Module, e: int) -> dict[str, Tensor]:
        """Views (no copy) of expert e's slices of the fused parameters."""
        return {name: getattr(experts, name).detach()[e] for name in self.expert_params}

    def expert_stack(self, experts: nn.Module, ids: Tensor | None = None) -> dict[str, Tensor]:
        """`expert_tensors` of the experts `ids` stacked along a new dim 0 ([N, ...]): views
        of the fused parameters for all experts (ids None), copies for a selection."""
        stack = {name: getattr(experts, name).detach() for name in self.expert_params}
        if ids is None:
            return stack
        return {name: t.index_select(0, ids.to(t.device)) for name, t in stack.items()}

    # The expert computation below serves one expert (tensors as `expert_tensors` gives
    # them, x [T, H]) and a stack of N experts (every tensor with a leading [N] dim, x
    # [N, M, H] or anything that broadcasts to it) alike: the batched MoE block runs the
    # same code as tracing, so the two cannot drift apart.

    def in_out(self, weight: Tensor) -> Tensor:
        """An expert weight (or a stack of them) as a [..., in, out] view, whatever the stored layout."""
        return weight if self.weights_in_out else weight.mT

    def project(self, w: Mapping[str, Tensor], name: str, x: Tensor, n: Tensor | float = 1) -> Tensor:
        """x W_name (+ n b_name, where the family has biases): `gate_up_proj` or `down_proj`."""
        out = x @ self.in_out(w[name])
        bias = w.get(name + "_bias")
        if bias is None:
            return out
        if w[name].dim() == 3:
            bias = bias.unsqueeze(-2)  # one bias row per stacked expert, broadcast over its rows
        # n == 1 adds the bias as is: the stock experts' rounding, bit for bit.
        return out + (bias if isinstance(n, (int, float)) and n == 1 else n * bias)

    def native_glu(self, experts: nn.Module) -> NativeGlu | None:
        """The glu as a native kernel computes it, for this experts module; None: torch only."""
        describe = getattr(self.glu_fn, "native", None)
        return describe(experts) if describe is not None else None

    def gate_fn(self, experts: nn.Module, w: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """The gated intermediate a = glu(x W_gate_up + b) [..., I]."""
        return self.glu_fn(experts, self.project(w, "gate_up_proj", x))

    def down_fn(self, w: Mapping[str, Tensor], a: Tensor, n: Tensor | float = 1) -> Tensor:
        """a W_down + n b_down: one output per row of a, or the sum of n outputs when a is
        the sum of n intermediates."""
        return self.project(w, "down_proj", a, n)

    def apply_expert(self, experts: nn.Module, weights: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Unweighted output of one expert given its tensors (e.g. copies on another
        device); `experts` supplies only the activation and its constants."""
        return self.down_fn(weights, self.gate_fn(experts, weights, x), 1)

    def unweighted_expert_outputs(self, experts: nn.Module, hidden: Tensor, ids: Tensor) -> Tensor:
        """[T*k, H]: row t*k+j is Expert_{ids[t,j]}(hidden[t]) with weight 1.

        Runs the stock experts module's forward (so its fast kernels; not its hooks)
        on one row per (token, slot), each routed to a single expert."""
        k = ids.shape[1]
        rows = hidden.repeat_interleave(k, dim=0)
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        return experts.forward(rows, ids.reshape(-1, 1), ones)

    def expert_forward(self, experts: nn.Module, e: int, x: Tensor) -> Tensor:
        """Unweighted output [T, H] of expert e on x [T, H]."""
        return self.apply_expert(experts, self.expert_tensors(experts, e), x)

    def summed_outputs(self, experts: nn.Module, gate_sums: Tensor, tokens: Tensor) -> Tensor:
        """sum_t Expert_e(x_t) [E, H] in float64, from sum_t a_e(x_t) [E, I] (the gated
        intermediates) and the token counts [E]: the down projection is affine.  One expert
        at a time: a float64 copy of all down projections at once would be large."""
        out = []
        for e in range(gate_sums.shape[0]):
            w = {k: v.double() for k, v in self.expert_tensors(experts, e).items() if k.startswith("down_proj")}
            out.append(self.down_fn(w, gate_sums[e].to(device=w["down_proj"].device, dtype=torch.float64),
                                    tokens[e].to(w["down_proj"].device)))
        return torch.stack(out)


# ----------------------------------------------------------------------- families

_ALL_FAMILIES: tuple[Family, ...] = (
    Family(
        name="qwen3_moe", router_attr="gate",
        sparse_layers=_qwen_sparse_layers,
    ),
    Family(
        name="qwen2_moe", router_attr="gate",
        shared_attr="shared_expert", shared_gate_attr="shared_expert_gate",
        shared_size_key="shared_expert_intermediate_size",
        sparse_layers=_qwen_sparse_layers,
    ),
    Family(
        name="mixtral", router_attr="gate",
        num_experts_key="num_local_experts", expert_size_key="intermediate_size",
        route_fn=_mixtral_route,
        published_layouts=(_MIXTRAL_PER_EXPERT,),
        checkpoint_renames=((".block_sparse_moe.", ".mlp."),),
    ),
    Family(
        name="olmoe", router_attr="gate",
        expert_size_key="intermediate_size",
    ),
    Family(
        name="deepseek_v2", router_attr="gate",
        shared_attr="shared_experts", shared_size_key="n_shared_experts",
        num_experts_key="n_routed_experts",
        sparse_layers=_after_first_k_dense, logits_fn=_fp32_logits, route_fn=_deepseek_v2_route,
    ),
    Family(
        name="deepseek_v3", router_attr="gate",
        shared_attr="shared_experts", shared_size_key="n_shared_experts",
        num_experts_key="n_routed_experts", scoring="sigmoid",
        sparse_layers=_after_first_k_dense, logits_fn=_fp32_logits, route_fn=_sigmoid_grouped_route,
    ),
    Family(
        name="glm4_moe", router_attr="gate",
        shared_attr="shared_experts", shared_size_key="n_shared_experts",
        num_experts_key="n_routed_experts", scoring="sigmoid",
        sparse_layers=_after_first_k_dense, logits_fn=_fp32_logits, route_fn=_sigmoid_grouped_route,
    ),
    Family(
        name="gpt_oss", router_attr="router",
        num_experts_key="num_local_experts", expert_size_key="intermediate_size",
        route_fn=_topk_then_softmax,
        experts_call=("hidden_states", "router_indices", "routing_weights"),
        expert_params=_GPT_OSS_PARAMS,
        glu_fn=_gpt_oss_glu, weights_in_out=True,
        published_layouts=(_GPT_OSS_MXFP4,),
    ),
    Family(
        name="phimoe", router_attr="router",
        num_experts_key="num_local_experts", expert_size_key="intermediate_size",
        fixed_top_k=2, route_fn=_sparsemixer_eval_route,
        published_layouts=(_MIXTRAL_PER_EXPERT,),
        checkpoint_renames=((".block_sparse_moe.gate.", ".mlp.router."), (".block_sparse_moe.", ".mlp.")),
    ),
)

FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in _ALL_FAMILIES})
_BY_MODEL_TYPE: Mapping[str, Family] = MappingProxyType(
    {mt: f for f in _ALL_FAMILIES for mt in f.model_types}
)

# Config fields whose presence (with a positive value) marks a Mixture-of-Experts config.
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _looks_moe(config) -> bool:
    for key in _EXPERT_COUNT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return True
    return False


def detect_family(model_or_config) -> Family:
    """The Family of a transformers model or config; UnsupportedModelError (one line) if none."""
    config = _config_of(model_or_config)
    model_type = getattr(config, "model_type", None) or type(config).__name__
    supported = ", ".join(sorted(FAMILIES))
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        if _looks_moe(config):
            raise UnsupportedModelError(
                f"model_type {model_type!r} is an MoE family specmoe does not describe "
                f"(supported: {supported})"
            )
        raise UnsupportedModelError(
            f"model_type {model_type!r} is a dense model with no MoE layers; specmoe needs a "
            f"Mixture-of-Experts model (supported: {supported})"
        )
    if not family.spec(config).moe_layers:
        raise UnsupportedModelError(
            f"this {model_type!r} config is a dense model with no MoE layers "
            f"(no decoder layer gets sparse experts); supported: {supported}"
        )
    return family


def router_fingerprint(model, family=None) -> str:
    """sha256 identifying a model's routing: every MoE layer's router weight, bias and
    selection bias, rounded to bf16, with their layer indices and shapes."""
    family = family or detect_family(model)
    state = ((l, name, t) for l in family.spec(model).moe_layers
             for name, t in family.router_state(family.router(model, l)))
    return fingerprint_router_state(family.spec(model), state)


def fingerprint_router_state(spec: MoESpec, state: Iterable[tuple[int, str, Tensor | None]]) -> str:
    """The router fingerprint of (layer, ROUTER_STATE name, tensor or None) triples, given
    layer by layer in ROUTER_STATE's order: from a loaded model or straight from its files."""
    h = hashlib.sha256()
    h.update(json.dumps({"family": spec.family, "moe_layers": list(spec.moe_layers),
                         "num_experts": spec.num_experts, "hidden_size": spec.hidden_size}).encode())
    for l, name, t in state:
        if t is None:
            continue
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(f"|{l}.{name}{tuple(t.shape)}|".encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()
