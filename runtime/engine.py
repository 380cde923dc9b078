"""The decode loop: prefill and decode_one_token over a model whose experts live off the GPU.

The runtime drives the decoder layers itself. Embeddings, attention, norms, dense
MLPs, shared experts and the LM head are the model's own modules (loaded without
their routed experts); every MoE block is replaced by `OffloadedMoE`, and keys and
values go to a preallocated `StaticKVCache`. One step over T tokens:

    x = embed(tokens)
    for each decoder layer l:
        r = x + attn_l(LN_attn_l(x))          model's module, static cache
        s = LN_moe_l(r)
        x = r + (OffloadedMoE(l, r, s)  if l is an MoE layer  else  mlp_l(s))
    logits = lm_head(norm(x))

A prefill is one step over the whole prompt (layer by layer, so the copies for
layer l+1 overlap layer l's compute); decoding is one step per token. Batch 1.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Iterator

import torch

from specmoe.errors import SpecmoeError

from .kv_cache import StaticKVCache, attention_masks
from .offloaded_moe import OffloadedMoE
from .streams import Streams
from .telemetry import Telemetry


class Engine:
    def __init__(self, model, family, spec, moe: OffloadedMoE, streams: Streams, telemetry: Telemetry, *,
                 max_context: int, tokenizer=None, info: dict | None = None):
        self.model, self.family, self.spec = model, family, spec
        self.moe, self.streams, self.telemetry = moe, streams, telemetry
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self.base = family.base_model(model)
        self.layers = family.decoder_layers(model)
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.max_context = int(max_context)
        self.cache = StaticKVCache(len(self.layers), self.max_context, self.device, self.dtype)
        self._moe_layers = set(spec.moe_layers)
        attn = self.layers[0].self_attn
        params = inspect.signature(attn.forward).parameters
        # transformers renamed the attention's cache argument (past_key_values -> cache)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.use_graphs = False     # decode steps from CUDA graphs (captured on the first decode step)
        self.compile = False        # their pieces compiled (runtime.compiled_pieces)
        self.compile_mode = "default"
        self.run_ahead = True       # graphed `cpu` decode may queue a layer ahead (RuntimeConfig.run_ahead)
        self._graphs = None
        self._kinds, self._window = [], None
        for layer in self.layers:
            window = getattr(layer.self_attn, "sliding_window", None)
            self._kinds.append("sliding" if window else "full")
            self._window = window or self._window

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run `token_ids` [T] at the next positions; logits [T or 1, vocab] (float32)."""
        T = int(token_ids.shape[0])
        start = self.cache.length
        if start + T > self.max_context:
            raise SpecmoeError(f"{start + T} tokens do not fit the context of {self.max_context} "
                               "(raise --max-context, up to the model's max_position_embeddings)")
        if T == 1 and self.use_graphs and self.moe.record_routing is None and not all_logits:
            if self._graphs is None:
                from .cuda_graphs import DecodeGraphs

                self._graphs = DecodeGraphs(self)
            return self._graphs.step(token_ids)
        positions = torch.arange(start, start + T, device=self.device)
        self.cache.set_positions(positions)
        x = self.embed(token_ids.to(self.device).reshape(1, T))
        pos = positions.reshape(1, T)
        rope = self.base.rotary_emb(x, pos)
        masks = attention_masks(set(self._kinds), positions, self.max_context, self._window, x.dtype)
        self.moe.begin_step()
        for l, layer in enumerate(self.layers):
            h = layer.input_layernorm(x)
            a = layer.self_attn(hidden_states=h, position_embeddings=rope, attention_mask=masks[self._kinds[l]],
                                position_ids=pos, **{self._cache_kw: self.cache})[0]
            r = x + a
            s = layer.post_attention_layernorm(r)
            if l in self._moe_layers:
                m = self.moe(l, r.reshape(T, -1), s.reshape(T, -1), start).reshape(1, T, -1)
            else:
                m = layer.mlp(s)
            x = r + m
        self.cache.length += T
        if T > 1:
            self.moe.end_prompt()
        x = self.base.norm(x)
        x = x[0] if all_logits else x[0, -1:]
        return self.model.lm_head(x).float()

    @property
    def decode_graphs(self):
        """The captured decode step (runtime.cuda_graphs.DecodeGraphs), None before the first
        graphed decode step."""
        return self._graphs

    def reset(self) -> None:
        """Forget the context (the expert cache on the GPU stays warm)."""
        self.cache.reset()

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids, max_new_tokens: int = 64, *, sampler: Callable | None = None,
                 stop: Callable[[list[int]], bool] | None = None) -> Iterator[int]:
        """Yield new token ids one at a time (greedy unless `sampler` is given). The prompt
        starts a fresh context."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise SpecmoeError("the prompt is empty")
        if ids.numel() + max_new_tokens > self.max_context:
            raise SpecmoeError(f"the prompt ({ids.numel()} tokens) plus {max_new_tokens} new tokens exceed the "
                               f"context of {self.max_context} tokens (raise --max-context or shorten the prompt)")
        sampler = sampler or greedy
        self.reset()
        self.telemetry.prompt_tokens += int(ids.numel())
        t0 = time.perf_counter()
        logits = self.step(ids)
        token = sampler(logits[-1])
        self.telemetry.prefill_seconds += time.perf_counter() - t0
        self.telemetry.mark_decode_start()
        out = [token]
        yield token
        for _ in range(max_new_tokens - 1):
            if stop is not None and stop(out):
                return
            t0 = time.perf_counter()
            logits = self.step(torch.tensor([token]))
            token = sampler(logits[-1])
            self.telemetry.step_seconds.append(time.perf_counter() - t0)
            out.append(token)
            yield token

    def close(self) -> None:
        """Stop the CPU expert threads and drop the captured graphs (they and the engine refer
        to each other, so without this their memory waits for the garbage collector)."""
        if self.moe.cpu is not None:
            self.moe.cpu.close()
        if self._graphs is not None:
            self._graphs.close()
        self._graphs = None
        self.moe.slots.on_evict = None


def greedy(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))


def make_sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Callable:
    """Greedy at temperature 0; otherwise temperature sampling restricted to the top-p nucleus."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise SpecmoeError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if temperature == 0:
        return greedy
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())

    def sample(logits: torch.Tensor) -> int:
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        if top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    return sample
