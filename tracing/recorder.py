"""Hooks that record what an MoE model really does, layer by layer.

Per traced MoE layer and token: the residual after attention r_l (input of the
pre-MoE norm), the router logits, and the top-k ids and combine weights handed
to the experts module. The ids and weights are taken from the experts' own
inputs rather than recomputed, because some families' selection cannot be
recovered from the logits alone. Over the whole run the recorder also sums the
unweighted output of each expert over the tokens routed to it, which gives the
default vectors D_l[e] of the quasi-hidden state.
"""

from __future__ import annotations

import torch



def to_host(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Start device->host copies into pinned memory without waiting for them.

    The caller must synchronise (HostBatch.wait) before reading; meanwhile the GPU
    can run the next forward pass."""
    if all(t.device.type == "cpu" for t in batch.values()):
        return batch
    out, devices = {}, set()
    for key, t in batch.items():
        if t.device.type == "cpu":
            out[key] = t
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out[key] = host
        devices.add(t.device)
    events = []
    for device in devices:  # a model sharded over GPUs copies from each GPU's own stream
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        events.append(event)
    out["__events__"] = events  # type: ignore[assignment]
    return out


def wait_host(batch: dict) -> dict[str, torch.Tensor]:
    for event in batch.pop("__events__", []):
        event.synchronize()
    return batch


class _StopForward(Exception):
    """Raised after the last traced layer so the untraced rest of the model is not computed."""


class TraceRecorder:
    def __init__(self, loaded, layers: list[int], store_dtype: torch.dtype = torch.bfloat16,
                 default_vector_every: int = 1, stop_after_last_layer: bool = True):
        self.family, self.spec, self.model = loaded.family, loaded.spec, loaded.model
        self.layers = list(layers)
        self.store_dtype = store_dtype
        self.every = max(1, int(default_vector_every))
        E, H = self.spec.num_experts, self.spec.hidden_size
        # float64 sums: millions of bf16 outputs are added per expert
        self.dv_sum = {l: torch.zeros(E, H, dtype=torch.float64) for l in self.layers}
        self.dv_tokens = {l: torch.zeros(E, dtype=torch.long) for l in self.layers}
        self.counts = {l: torch.zeros(E, dtype=torch.long) for l in self.layers}
        self._in_default_vectors = False
        self._device_sums: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._batch: dict[str, torch.Tensor] = {}
        self._token_offset = 0  # global index of the current batch's first token, for the D_l subsample
        self._handles = []
        last = max(self.layers)
        self._stop_layer = last if stop_after_last_layer and last < max(self.spec.moe_layers) else None
        self._install()

    # -- hooks ------------------------------------------------------------
    def _install(self) -> None:
        fam, model = self.family, self.model
        for layer in self.layers:
            norm, router, experts = fam.moe_norm(model, layer), fam.router(model, layer), fam.experts(model, layer)
            self._handles.append(norm.register_forward_pre_hook(self._on_norm_input(layer)))
            self._handles.append(router.register_forward_hook(self._on_router_output(layer)))
            self._handles.append(experts.register_forward_pre_hook(self._on_experts_input(layer), with_kwargs=True))

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

    def _on_experts_input(self, layer: int):
        def hook(module, args, kwargs):
            if self._in_default_vectors:  # our own call of the experts below
                return None
            hidden, ids, weights = self.family.captured_routing(args, kwargs)
            self._batch[f"layers.{layer}.topk_ids"] = ids.to(torch.int32)
            self._batch[f"layers.{layer}.topk_weights"] = weights.to(torch.float32)
            self._accumulate(layer, module, hidden, ids)
            if layer == self._stop_layer:
                raise _StopForward
        return hook

    @torch.no_grad()
    def _accumulate(self, layer: int, experts, hidden: torch.Tensor, ids: torch.Tensor) -> None:
        if layer not in self._device_sums:  # accumulate where the layer lives: no host sync per batch
            dev = hidden.device
            self._device_sums[layer] = (self.dv_sum[layer].to(dev), self.dv_tokens[layer].to(dev),
                                        self.counts[layer].to(dev))
        sums, tokens, counts = self._device_sums[layer]
        # index_add_, not bincount: bincount on CUDA waits for the GPU to size its output
        counts.index_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1), dtype=counts.dtype))
        if self.every > 1:
            first = (-self._token_offset) % self.every
            pick = torch.arange(first, hidden.shape[0], self.every, device=hidden.device)
            hidden, ids = hidden[pick], ids[pick]
        flat_ids = ids.reshape(-1)
        self._in_default_vectors = True
        try:
            outputs = self.family.unweighted_expert_outputs(experts, hidden, ids)
        finally:
            self._in_default_vectors = False
        sums.index_add_(0, flat_ids, outputs.to(sums.dtype))
        tokens.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=tokens.dtype))

    def _sync_to_host(self) -> None:
        for layer, (sums, tokens, counts) in self._device_sums.items():
            self.dv_sum[layer], self.dv_tokens[layer], self.counts[layer] = sums.cpu(), tokens.cpu(), counts.cpu()

    # -- driving ------------------------------------------------------------
    @torch.no_grad()
    def run_batch(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward one batch of rows [B, S]; return the trace batch on the CPU."""
        self._batch = {}
        base = self.family.base_model(self.model)
        try:
            base(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        self._token_offset += input_ids.numel()
        out = {"token_ids": input_ids.reshape(-1).to(torch.int32)}
        out.update(self._batch)
        return to_host(out)

    def state(self) -> dict[str, torch.Tensor]:
        """A host copy of the accumulators (taken at shard boundaries, for --resume)."""
        self._sync_to_host()
        state = {"token_offset": torch.tensor([self._token_offset], dtype=torch.long)}
        for l in self.layers:
            state[f"layers.{l}.dv_sum"] = self.dv_sum[l].clone()
            state[f"layers.{l}.dv_tokens"] = self.dv_tokens[l].clone()
            state[f"layers.{l}.counts"] = self.counts[l].clone()
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._token_offset = int(state["token_offset"][0])
        for l in self.layers:
            self.dv_sum[l] = state[f"layers.{l}.dv_sum"].clone()
            self.dv_tokens[l] = state[f"layers.{l}.dv_tokens"].clone()
            self.counts[l] = state[f"layers.{l}.counts"].clone()
        self._device_sums = {}

    def default_vectors(self) -> dict[str, torch.Tensor]:
        self._sync_to_host()
        out = {}
        for l in self.layers:
            n = self.dv_tokens[l].clamp(min=1).double().unsqueeze(1)
            out[f"layers.{l}.default_vectors"] = (self.dv_sum[l] / n).float()  # never-selected experts stay 0
            out[f"layers.{l}.expert_counts"] = self.counts[l].clone()
            out[f"layers.{l}.default_vector_tokens"] = self.dv_tokens[l].clone()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
