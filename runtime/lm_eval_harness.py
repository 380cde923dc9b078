"""specmoe as a model of lm-evaluation-harness: downstream tasks per runtime mode.

    python -m runtime.lm_eval_harness --model specmoe --device cpu \\
        --model_args pretrained=checkpoints/demo-moe,estimators=checkpoints/demo-estimator-h1,prefetch=hybrid,on_miss=speculate \\
        --tasks demo_cloze --include_path benchmarks/lm_eval_tasks

lm-evaluation-harness finds models by name in its registry and has no plugin entry
point for them, so this module registers `specmoe` and then runs the harness's own
command line. From Python, `import runtime.lm_eval_harness` is enough before
`lm_eval.simple_evaluate(model="specmoe", ...)`.

Log-likelihoods use the same teacher-forced forward as `infer eval`: the context runs
exactly, as a prefill, and every continuation token runs on the experts the chosen
mode would run when decoding it (`speculate`: the predicted ones). Generation goes
through the runtime's own decode loop. `on_miss=fetch` (or `cpu`) is the exact model.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (the harness's own models register only while its registry is empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from specmoe.errors import SpecmoeError, cli_errors, first_line

from .build import configure, load_parts
from .config import RuntimeConfig
from .evaluate import _logits


def _value(v: str):
    if isinstance(v, str) and v.lower() in ("none", "null"):
        return None
    return v


@register_model("specmoe")
class SpecmoeLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, estimators: str | None = None, prefetch: str = "auto",
                 on_miss: str = "speculate", device: str = "auto", dtype: str = "auto",
                 gpu_expert_budget: str = "100%", max_length: int = 2048, default_vectors: str | None = None,
                 batch_size: int | str = 1, **_ignored):
        super().__init__()
        # The harness's argument parser turns the word "none" into None; its --device arrives
        # here as `device` (None when not given).
        prefetch = "none" if prefetch is None else str(prefetch)
        device = "auto" if device is None else str(device)
        config = RuntimeConfig(model=_value(pretrained), estimators=_value(estimators), prefetch=prefetch,
                               on_miss=on_miss, device=device, dtype=dtype, gpu_expert_budget=str(gpu_expert_budget),
                               max_context=int(max_length), default_vectors=_value(default_vectors),
                               track_hits=True).validate()
        self.config = config
        self.parts = load_parts(config, progress=False)
        self.engine = configure(self.parts, config)
        self.tokenizer = self.parts.tokenizer
        self.max_length = self.engine.max_context
        self.speculate = config.on_miss == "speculate"

    # ------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------ scoring

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        seq = (context + continuation)[-(self.max_length + 1):]
        n_ctx = len(seq) - len(continuation)
        inputs = torch.tensor(seq[:-1])
        if n_ctx >= len(inputs):   # a one-token continuation is predicted by the exact prefill alone
            logits = _logits(self.engine, inputs, 0, False)
        else:
            logits = _logits(self.engine, inputs, n_ctx, self.speculate)
        cont_logits = logits[n_ctx - 1:]
        target = torch.tensor(continuation)
        logp = F.log_softmax(cont_logits.float(), dim=-1)
        total = float(logp.gather(1, target[:, None]).sum())
        greedy = bool((cont_logits.argmax(-1) == target).all())
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [self._score(list(ctx), list(cont))
                for _, ctx, cont in tqdm(requests, desc="specmoe loglikelihood", disable=disable_tqdm)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in tqdm([r.args for r in requests], desc="specmoe rolling", disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._score(list(ctx), list(cont))[0] for ctx, cont in windows))
        return out

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from .engine import make_sampler

        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="specmoe generate", disable=disable_tqdm):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            sampler = make_sampler(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                                   float(kwargs.get("top_p", 1.0)), kwargs.get("seed"))
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            tokens: list[int] = []
            for token in self.engine.generate(torch.tensor(ids), max_new, sampler=sampler,
                                              stop=lambda t: any(u in self.tok_decode(t) for u in until)):
                if token == self.eot_token_id:
                    break
                tokens.append(token)
            text = self.tok_decode(tokens)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


@cli_errors("python -m runtime.lm_eval_harness")
def main(argv: list[str] | None = None) -> int:
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except (ValueError, KeyError) as err:  # the harness's own "task not found" and the like
        raise SpecmoeError(first_line(err)) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
