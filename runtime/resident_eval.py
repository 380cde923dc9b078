"""`infer eval` for a model held whole on its devices (one GPU, or several through
`device_map="auto"`): the same teacher-forced speculative evaluation as runtime.evaluate,
without an expert store.

The stock model runs its own forward over each sequence; every MoE block's forward is
replaced by one that routes each token on the experts predicted from its own states h
MoE layers earlier (positions before `exact_prefix`, and the first h MoE layers, route
truly) and computes them with the base package's batched MoE block over the layer's own
expert tensors. Attention and everything else is the model's, on whichever device
accelerate put it. tests/test_evaluate.py checks it against the offloaded runtime.
"""

from __future__ import annotations

import types

import torch

from specmoe.moe_block import moe_block_forward


class ResidentSpeculation:
    def __init__(self, model, family, spec, predictor, telemetry):
        self.model, self.family, self.spec = model, family, spec
        self.predictor, self.telemetry = predictor, telemetry
        self.exact_prefix = 0
        self.speculate = True
        self._residual: dict[int, torch.Tensor] = {}
        self._predicted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        self._originals = {}
        for l in spec.moe_layers:
            self._install(l)

    def _install(self, layer: int) -> None:
        family = self.family
        norm = family.moe_norm(self.model, layer)
        self._handles.append(norm.register_forward_pre_hook(
            lambda module, args, l=layer: self._residual.__setitem__(l, args[0])))
        block = family.moe_block(self.model, layer)
        probe = torch.zeros(1, 1, self.spec.hidden_size, dtype=next(block.parameters()).dtype,
                            device=next(p for p in block.parameters() if not p.is_meta).device)
        with torch.no_grad():
            returns_tuple = isinstance(block(probe), tuple)   # GPT-OSS's block also returns router scores
        # accelerate's device hooks call `_old_forward`; without them the module calls `forward`
        attr = "_old_forward" if hasattr(block, "_old_forward") else "forward"
        self._originals[layer] = (block, attr, getattr(block, attr))
        setattr(block, attr, types.MethodType(
            lambda module, hidden, *a, l=layer, t=returns_tuple, **k: self._block(l, module, hidden, t), block))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for block, attr, original in self._originals.values():
            setattr(block, attr, original)

    def _block(self, layer: int, block, hidden: torch.Tensor, returns_tuple: bool):
        family, spec = self.family, self.spec
        shape = hidden.shape
        s = hidden.reshape(-1, shape[-1])
        router = getattr(block, family.router_attr)
        true_ids, true_w = family.route(router, family.router_logits(router, s))
        ids, w = true_ids, true_w
        pred = self._predicted.pop(layer, None)
        if pred is not None:
            p_ids, p_w = (t.to(s.device) for t in pred)
            self.telemetry.prefetch_hits_device(layer, p_ids, true_ids)
            if self.speculate:
                spec_rows = torch.arange(s.shape[0], device=s.device) >= self.exact_prefix
                ids = torch.where(spec_rows[:, None], p_ids.to(true_ids.dtype), true_ids)
                w = torch.where(spec_rows[:, None], p_w.to(true_w.dtype), true_w)
        experts = getattr(block, family.experts_attr)
        stack = family.expert_stack(experts)
        table = torch.arange(spec.num_experts, device=s.device)
        out, _, _ = moe_block_forward(family, block, s, stack, table, ids=ids, weights=w)
        target = self.predictor.target_of(layer) if self.predictor is not None else None
        if target is not None:
            r = self._residual.pop(layer).reshape(-1, shape[-1])
            dev = self.predictor_device
            # Predictions chain: layer l's own (predicted) routing feeds the prediction of l+h.
            self._predicted[target] = self.predictor.predict(target, r.to(dev), s.to(dev), ids.to(dev), w.to(dev), 0)
        out = out.reshape(shape)
        return (out, None) if returns_tuple else out

    @property
    def predictor_device(self) -> torch.device:
        est = getattr(self.predictor, "estimator", None)
        return est.device if est is not None else torch.device("cpu")

    @torch.inference_mode()
    def logits(self, seq: torch.Tensor, exact_prefix: int, speculate: bool, predictor=None,
               telemetry=None) -> torch.Tensor:
        """Logits of `seq` [L] with `predictor` driving the blocks (None: exact), counted in
        `telemetry` (default: the one given at construction)."""
        self.predictor = predictor
        self.telemetry = telemetry if telemetry is not None else self.telemetry
        self.exact_prefix, self.speculate = exact_prefix, speculate
        self._predicted.clear()
        device = self.model.get_input_embeddings().weight.device
        out = self.model(seq.reshape(1, -1).to(device), use_cache=False).logits[0]
        return out.float().cpu()
