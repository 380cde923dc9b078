"""Hooks that record what an MoE model really does, layer by layer.

Per traced MoE layer and token: the residual after attention r_l (input of the
pre-MoE norm), the router logits, and the top-k ids and combine weights handed
to the experts module. The ids and weights are taken from the experts' own
inputs rather than recomputed, because some families' selection cannot be
recovered from the logits alone. Over the whole run the recorder also sums the
unweighted output of each expert over the tokens routed to it, which gives the
default vectors D_l[e] of the quasi-hidden state.

Those unweighted outputs cost a second pass over the experts unless they are
read off the model's own pass. Expert e's output is linear in its gated
intermediate a = act(gate) * up: E_e(x) = W_down[e] a (+ b_down[e]). So the sum
over tokens equals W_down[e] applied to the sum of the intermediates (the family
description's `summed_outputs`), which the
recorder collects from the experts' `_apply_gate` as the stock forward runs
(grouped and batched implementations call it; the forward itself is untouched).
On the first call it checks the result against a real second pass and uses the
second pass from then on where the two disagree (an implementation that never
calls `_apply_gate`, a norm after the experts, rows in an unknown order).
"""

from __future__ import annotations

import warnings

import torch

from specmoe.errors import CorruptFileError, SpecmoeWarning


class _StopForward(Exception):
    """Raised after the last traced layer so the untraced rest of the model is not computed."""


def _expert_sums(ids: torch.Tensor, rows: torch.Tensor, num_experts: int,
                 keep: torch.Tensor | None) -> torch.Tensor:
    """[E, D] float32 sums of `rows` [S, D] grouped by expert id `ids` [S] (where `keep`).

    On a GPU a one-hot matmul with float32 accumulation: a scatter-add of S x D
    atomics would first need the rows converted to float32."""
    if rows.device.type == "cuda" and rows.dtype in (torch.bfloat16, torch.float16):
        onehot = ids.unsqueeze(0) == torch.arange(num_experts, device=ids.device).unsqueeze(1)
        if keep is not None:
            onehot &= keep.unsqueeze(0)
        try:
            return torch.mm(onehot.to(rows.dtype), rows, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=...)
            pass
    rows = rows.float()
    if keep is not None:
        rows = rows * keep.unsqueeze(1)
    return torch.zeros(num_experts, rows.shape[1], dtype=torch.float32, device=rows.device).index_add_(0, ids, rows)


def _can_tap(experts) -> bool:
    """Whether the sum of outputs can come from tapped intermediates: a gate to tap, and
    nothing non-linear after the down projection."""
    return callable(getattr(experts, "_apply_gate", None)) and not getattr(experts, "has_post_expert_norm", False)


class _Accumulators:
    """Per-layer running sums, kept on the layer's device (no host sync per batch)."""

    FIELDS = ("dv_sum", "gate_sum", "gate_tokens", "dv_tokens", "counts")

    def __init__(self, num_experts: int, hidden: int, intermediate: int, device="cpu"):
        E = num_experts
        self.dv_sum = torch.zeros(E, hidden, dtype=torch.float64, device=device)        # second-pass outputs
        self.gate_sum = torch.zeros(E, intermediate, dtype=torch.float64, device=device)  # tapped a_e
        self.gate_tokens = torch.zeros(E, dtype=torch.long, device=device)  # rows in gate_sum (for the bias)
        self.dv_tokens = torch.zeros(E, dtype=torch.long, device=device)    # rows behind D, both ways
        self.counts = torch.zeros(E, dtype=torch.long, device=device)       # all routed rows

    def to(self, device) -> "_Accumulators":
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).to(device))
        return self


class TraceRecorder:
    def __init__(self, loaded, layers: list[int], store_dtype: torch.dtype = torch.bfloat16,
                 default_vector_every: int = 1, stop_after_last_layer: bool = True, tap: bool = True):
        self.family, self.spec, self.model = loaded.family, loaded.spec, loaded.model
        self.layers = list(layers)
        self.store_dtype = store_dtype
        self.every = max(1, int(default_vector_every))
        # "sorted" / "original": rows of the tapped intermediates grouped by expert or in (token, slot)
        # order; "second pass": no tap. None until the first call has checked.
        self.mode: str | None = None if tap else "second pass"
        self._experts = {l: self.family.experts(self.model, l) for l in self.layers}
        self.acc = {l: _Accumulators(self.spec.num_experts, self.spec.hidden_size, self.spec.expert_intermediate_size)
                    for l in self.layers}
        self._on_device: set[int] = set()
        # accumulators that may be non-zero; state() leaves the others out (they can be large)
        self._touched = {"counts", "dv_tokens"}
        self._batch: dict[str, torch.Tensor] = {}
        self._taps: dict[int, list[torch.Tensor]] = {}
        self._in_second_pass = False
        self._token_offset = 0  # global index of the current batch's first token, for the D_l subsample
        self._handles = []
        self._patched = []
        last = max(self.layers)
        self._stop_layer = last if stop_after_last_layer and last < max(self.spec.moe_layers) else None
        self._install()

    # -- hooks ------------------------------------------------------------
    def _install(self) -> None:
        fam, model = self.family, self.model
        for layer in self.layers:
            norm, router, experts = fam.moe_norm(model, layer), fam.router(model, layer), self._experts[layer]
            self._handles.append(norm.register_forward_pre_hook(self._on_norm_input(layer)))
            self._handles.append(router.register_forward_hook(self._on_router_output(layer)))
            self._handles.append(experts.register_forward_pre_hook(self._on_experts_input(layer)))
            self._handles.append(experts.register_forward_hook(self._on_experts_output(layer), with_kwargs=True))
            if self.mode is None and _can_tap(experts):
                # an instance attribute shadows the class's method for this module only
                experts._apply_gate = self._tap(layer, experts._apply_gate)
                self._patched.append(experts)

    def _on_norm_input(self, layer: int):
        def hook(module, args):
            r = args[0]
            self._batch[f"layers.{layer}.residual"] = r.reshape(-1, r.shape[-1]).to(self.store_dtype)
        return hook

    def _on_router_output(self, layer: int):
        def hook(module, args, output):
            logits = self.family.captured_logits(output)
            self._batch[f"layers.{layer}.router_logits"] = logits.reshape(-1, logits.shape[-1]).to(self.store_dtype)
        return hook

    def _tap(self, layer: int, apply_gate):
        def tapped(gate_up):
            out = apply_gate(gate_up)
            if not self._in_second_pass:
                self._taps.setdefault(layer, []).append(out)
            return out
        return tapped

    def _on_experts_input(self, layer: int):
        def hook(module, args):
            self._taps[layer] = []
        return hook

    def _on_experts_output(self, layer: int):
        def hook(module, args, kwargs, output):
            hidden, ids, weights = self.family.captured_routing(args, kwargs)
            # stored as the model produced them; the writer converts on the host
            self._batch[f"layers.{layer}.topk_ids"] = ids
            self._batch[f"layers.{layer}.topk_weights"] = weights
            self._accumulate(layer, module, hidden, ids, self._taps.pop(layer, []))
            if layer == self._stop_layer:
                raise _StopForward
        return hook

    # -- default vectors ------------------------------------------------------
    def _keep(self, n_rows: int, k: int, device) -> torch.Tensor | None:
        """Which (token, slot) rows count towards D_l: those of every self.every-th token of the run."""
        if self.every == 1:
            return None
        token = torch.arange(n_rows, device=device) // k
        return (token + self._token_offset) % self.every == 0

    def _second_pass(self, experts, hidden, flat_ids, k: int) -> torch.Tensor:
        """[E, H] float32 sums of the unweighted outputs, from calling the experts again with weight 1 per
        (token, slot) row, on the subsampled tokens only."""
        first = (-self._token_offset) % self.every
        tokens = torch.arange(first, hidden.shape[0], self.every, device=hidden.device)
        ids = flat_ids.view(-1, k)[tokens]
        self._in_second_pass = True
        try:
            outputs = self.family.unweighted_expert_outputs(experts, hidden[tokens], ids)
        finally:
            self._in_second_pass = False
        return _expert_sums(ids.reshape(-1), outputs, self.spec.num_experts, None)

    def _tapped_sums(self, taps, flat_ids, k: int, order: str) -> torch.Tensor | None:
        """[E, I] float32 sums of the tapped intermediates, or None where they cannot be lined up."""
        if not taps or sum(t.shape[0] for t in taps) != flat_ids.shape[0]:
            return None
        a = taps[0] if len(taps) == 1 else torch.cat(taps)
        keep = self._keep(flat_ids.shape[0], k, flat_ids.device)
        ids = flat_ids
        if order == "sorted":
            ids, perm = torch.sort(flat_ids)  # the grouped implementation's own call: the same permutation
            keep = keep[perm] if keep is not None else None
        return _expert_sums(ids, a, self.spec.num_experts, keep)

    def _decide(self, experts, flat_ids, k: int, taps, reference: torch.Tensor) -> None:
        """Pick the row order under which the tapped sums give the second pass's result."""
        for order in ("sorted", "original"):
            sums = self._tapped_sums(taps, flat_ids, k, order)
            if sums is None:
                break
            keep = self._keep(flat_ids.shape[0], k, flat_ids.device)
            n = torch.zeros(self.spec.num_experts, dtype=torch.long, device=flat_ids.device).index_add_(
                0, flat_ids, keep.long() if keep is not None else torch.ones_like(flat_ids))
            candidate = self.family.summed_outputs(experts, sums.double(), n).to(reference.device)
            err = (candidate - reference.double()).norm() / reference.double().norm().clamp(min=1e-30)
            if err.item() < 1e-2:
                self.mode = order
                return
        self.mode = "second pass"
        for experts_module in self._patched:
            del experts_module._apply_gate
        self._patched = []
        warnings.warn("the experts' intermediate outputs could not be read off the forward pass; default "
                      "vectors take a second pass over the experts (slower)", SpecmoeWarning, stacklevel=4)

    @torch.no_grad()
    def _accumulate(self, layer: int, experts, hidden, ids, taps) -> None:
        acc = self.acc[layer]
        if layer not in self._on_device:  # accumulate where the layer lives: no host sync per batch
            acc.to(hidden.device)
            self._on_device.add(layer)
        k = ids.shape[1]
        flat_ids = ids.reshape(-1)
        ones = torch.ones_like(flat_ids)
        # index_add_, not bincount: bincount on CUDA waits for the GPU to size its output
        acc.counts.index_add_(0, flat_ids, ones)
        keep = self._keep(flat_ids.shape[0], k, flat_ids.device)
        used = ones if keep is None else keep.long()
        reference = None
        if self.mode is None:  # first call: tap and second pass side by side
            reference = self._second_pass(experts, hidden, flat_ids, k)
            self._decide(experts, flat_ids, k, taps, reference)
        # each sum only ever takes one kind of term, so a resumed run adds up bit for bit alike
        tapped = None if self.mode == "second pass" else self._tapped_sums(taps, flat_ids, k, self.mode)
        if tapped is not None:
            acc.gate_sum += tapped
            acc.gate_tokens.index_add_(0, flat_ids, used)
            self._touched |= {"gate_sum", "gate_tokens"}
        else:  # the fallback, or a call whose intermediates did not line up
            acc.dv_sum += reference if reference is not None else self._second_pass(experts, hidden, flat_ids, k)
            self._touched.add("dv_sum")
        acc.dv_tokens.index_add_(0, flat_ids, used)

    # -- driving ------------------------------------------------------------
    @torch.no_grad()
    def run_batch(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward one batch of rows [B, S]; return the trace batch, on the device(s) of its layers
        (the writer copies it to the host while the next batch runs)."""
        self._batch = {}
        base = self.family.base_model(self.model)
        try:
            base(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        self._token_offset += input_ids.numel()
        out = {"token_ids": input_ids.reshape(-1).to(torch.int32)}
        out.update(self._batch)
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """The accumulators for --resume: live tensors on their device (the trace writer takes
        its snapshot without waiting for the GPU); copy them to keep them."""
        state = {"token_offset": torch.tensor([self._token_offset], dtype=torch.long)}
        for l in self.layers:
            for name in _Accumulators.FIELDS:
                if name in self._touched:
                    state[f"layers.{l}.{name}"] = getattr(self.acc[l], name)
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._token_offset = int(state["token_offset"][0])
        for l in self.layers:
            acc = self.acc[l]
            for name in _Accumulators.FIELDS:
                saved = state.get(f"layers.{l}.{name}")
                if saved is None:  # never touched by the run that saved it: still zero
                    continue
                if saved.shape != getattr(acc, name).shape:
                    raise CorruptFileError(f"saved {name} of layer {l} has shape {tuple(saved.shape)}, "
                                     f"expected {tuple(getattr(acc, name).shape)}")
                setattr(acc, name, saved.clone())
                self._touched.add(name)
        self._on_device = set()

    @property
    def counts(self) -> dict[int, torch.Tensor]:
        """Routed (token, slot) rows per expert and layer, over the whole run."""
        return {l: self.acc[l].counts.cpu() for l in self.layers}

    @torch.no_grad()
    def default_vectors(self) -> dict[str, torch.Tensor]:
        out = {}
        for l in self.layers:
            acc = self.acc[l]
            total = acc.dv_sum.clone()
            if acc.gate_tokens.sum() > 0:
                total += self.family.summed_outputs(self._experts[l], acc.gate_sum, acc.gate_tokens).to(total.device)
            n = acc.dv_tokens.clamp(min=1).double().unsqueeze(1)
            out[f"layers.{l}.default_vectors"] = (total / n).float().cpu()  # never-selected experts stay 0
            out[f"layers.{l}.expert_counts"] = acc.counts.cpu()
            out[f"layers.{l}.default_vector_tokens"] = acc.dv_tokens.cpu()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for experts in self._patched:
            del experts._apply_gate  # back to the class's own method
        self._patched = []
