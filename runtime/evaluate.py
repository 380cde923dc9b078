"""What speculation costs in accuracy: every mode against the exact model on held-out text.

Each sequence runs once exactly and once per speculative mode, teacher-forced: the
whole sequence goes through the runtime layer by layer, and at every MoE layer each
token uses the experts and weights predicted from its own states h layers earlier
(the first MoE layer routes truly), exactly as decoding the sequence one token at a
time in `speculate` would. Attention reads keys and values computed the same way, so
position i's logits equal those of speculative decoding (tests/test_evaluate.py
checks it). The first `exact_prefix` tokens of each sequence run exactly, as a
prefill would.

Per mode: perplexity and its change against the exact model, top-1 agreement with
the exact next-token prediction, KL(exact || mode) of the next-token distributions,
prediction hit rate (recall@k) per layer and the share of tokens whose predicted set
was exactly right.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specmoe.errors import SpecmoeError

from .build import ModelParts, configure
from .config import RuntimeConfig

SPECULATIVE = ("current", "quasi", "learned", "hybrid")
# The paper's names for the same predictors.
PAPER_NAMES = {"quasi": "Router-PF", "learned": "Est-PF", "hybrid": "Hybrid-PF", "current": "next router on s_l"}


def _logits(engine, seq: torch.Tensor, exact_prefix: int, speculate: bool) -> torch.Tensor:
    engine.reset()
    rows = []
    if exact_prefix:
        engine.moe.speculate_many = False
        rows.append(engine.step(seq[:exact_prefix], all_logits=True))
    engine.moe.speculate_many = speculate
    rows.append(engine.step(seq[exact_prefix:], all_logits=True))
    engine.moe.speculate_many = False
    return torch.cat(rows).float().cpu()


class _Scores:
    def __init__(self):
        self.nll = self.agree = self.kl = 0.0
        self.tokens = 0

    def add(self, logits: torch.Tensor, exact: torch.Tensor, targets: torch.Tensor) -> None:
        logp = F.log_softmax(logits, dim=-1)
        self.nll += float(-logp.gather(1, targets[:, None]).sum())
        self.agree += float((logits.argmax(-1) == exact.argmax(-1)).sum())
        exact_logp = F.log_softmax(exact, dim=-1)
        self.kl += float((exact_logp.exp() * (exact_logp - logp)).sum())
        self.tokens += int(targets.numel())

    def result(self) -> dict:
        n = max(self.tokens, 1)
        return {"tokens": self.tokens, "perplexity": math.exp(self.nll / n), "top1_agreement": self.agree / n,
                "kl_from_exact": self.kl / n}


def _check(modes: list[str], sequences: torch.Tensor, exact_prefix: int) -> int:
    for m in modes:
        if m not in SPECULATIVE:
            raise SpecmoeError(f"unknown mode {m!r}; choose from {', '.join(SPECULATIVE)}")
    if sequences.dim() != 2 or sequences.shape[0] == 0:
        raise SpecmoeError("no sequence to evaluate (the split is empty or shorter than one row)")
    L = sequences.shape[1]
    if not 0 <= exact_prefix < L - 1:
        raise SpecmoeError(f"--exact-prefix must lie in [0, {L - 2}] for sequences of {L} tokens (got {exact_prefix})")
    return L


def _score(runners: dict, sequences: torch.Tensor, exact_prefix: int, progress: bool) -> dict:
    """runners: {"exact": fn(seq) -> logits, mode: (fn, telemetry, info)}; the scores table."""
    modes = [m for m in runners if m != "exact"]
    scores = {"exact": _Scores(), **{m: _Scores() for m in modes}}
    bar = tqdm(total=len(sequences) * (1 + len(modes)), desc="infer eval", unit="seq", disable=not progress)
    first = max(exact_prefix - 1, 0)   # logits at position i predict token i + 1
    for seq in sequences:
        targets = seq[first + 1:]
        exact = runners["exact"](seq)[first:-1]
        scores["exact"].add(exact, exact, targets)
        bar.update(1)
        for m in modes:
            scores[m].add(runners[m][0](seq)[first:-1], exact, targets)
            bar.update(1)
    bar.close()
    out = {"sequences": int(sequences.shape[0]), "seq_len": int(sequences.shape[1]), "exact_prefix": exact_prefix,
           "modes": {}}
    base_ppl = scores["exact"].result()["perplexity"]
    for name, sc in scores.items():
        row = sc.result()
        row["perplexity_change"] = row["perplexity"] / base_ppl - 1.0
        if name != "exact":
            _, telemetry, info = runners[name]
            tel = telemetry.summary()
            row["hit_rate"] = tel["prefetch_hit_rate"]
            row["exact_set_rate"] = tel["exact_set_rate"]
            row["hit_rate_per_layer"] = {l: v["prefetch_hit_rate"] for l, v in tel["per_layer"].items()
                                         if v["prefetch_hit_rate"] is not None}
            row["paper_name"] = PAPER_NAMES[name]
            row["lookahead"] = info["lookahead"]
        out["modes"][name] = row
    return out


def evaluate(parts: ModelParts, base: RuntimeConfig, modes: list[str], sequences: torch.Tensor,
             exact_prefix: int = 0, progress: bool = True) -> dict:
    """Scores of the exact model and of `speculate` with each predictor in `modes` on
    `sequences` [N, L] (token ids), through the offloaded runtime; positions before
    `exact_prefix` are not scored."""
    L = _check(modes, sequences, exact_prefix)
    base = dataclasses.replace(base, max_context=max(base.max_context, L), cuda_graphs=False, track_hits=True)
    exact_engine = configure(parts, dataclasses.replace(base, prefetch="none", on_miss="fetch"))
    engines = {m: configure(parts, dataclasses.replace(base, prefetch=m, on_miss="speculate")) for m in modes}
    runners = {"exact": lambda seq: _logits(exact_engine, seq, exact_prefix, False)}
    for m, engine in engines.items():
        runners[m] = ((lambda seq, e=engine: _logits(e, seq, exact_prefix, True)), engine.telemetry, engine.info)
    try:
        return _score(runners, sequences, exact_prefix, progress)
    finally:
        for engine in (exact_engine, *engines.values()):
            engine.close()


def evaluate_resident(model, base: RuntimeConfig, modes: list[str], sequences: torch.Tensor,
                      exact_prefix: int = 0, progress: bool = True) -> dict:
    """The same scores for a model held whole on its devices (a single one, or several through
    device_map): runtime.resident_eval takes over its MoE blocks for each run."""
    from specmoe.families import detect_family

    from .predict import build_predictor, lookahead_of
    from .resident_eval import ResidentSpeculation
    from .telemetry import Telemetry

    _check(modes, sequences, exact_prefix)
    family = detect_family(model)
    spec = family.spec(model)
    device = model.get_input_embeddings().weight.device
    lookahead = lookahead_of(base)

    # The blocks are taken over once; each run names its predictor (None: exact).
    hooked = ResidentSpeculation(model, family, spec, None, Telemetry(tuple(spec.moe_layers), device))
    runners = {"exact": lambda seq: hooked.logits(seq, exact_prefix, False)}
    for m in modes:
        predictor = build_predictor(m, model, family, spec, estimators=base.estimators,
                                    default_vectors=base.default_vectors, lookahead=lookahead, device=device)
        telemetry = Telemetry(tuple(spec.moe_layers), device)
        run = (lambda seq, p=predictor, t=telemetry: hooked.logits(seq, exact_prefix, True, p, t))
        runners[m] = (run, telemetry, {"lookahead": predictor.lookahead})
    try:
        return _score(runners, sequences, exact_prefix, progress)
    finally:
        hooked.remove()


def markdown(result: dict) -> str:
    lines = [f"{result['sequences']} sequences of {result['seq_len']} tokens; first {result['exact_prefix']} tokens "
             "of each exact (not scored).", "",
             "| mode | paper | perplexity | change | top-1 agreement | KL from exact | hit rate | exact set |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["modes"].items():
        def f(key, fmt):
            return "-" if r.get(key) is None else format(r[key], fmt)
        lines.append(f"| {name} | {r.get('paper_name', 'baseline')} | {f('perplexity', '.3f')} "
                     f"| {f('perplexity_change', '+.2%')} | {f('top1_agreement', '.3f')} | {f('kl_from_exact', '.4f')} "
                     f"| {f('hit_rate', '.3f')} | {f('exact_set_rate', '.3f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in result["modes"] if m != "exact"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    styles = ["o-", "s--", "D:", "^-."]
    for i, m in enumerate(modes):
        per = result["modes"][m]["hit_rate_per_layer"]
        layers = sorted(per, key=int)
        a.plot([int(l) for l in layers], [per[l] for l in layers], styles[i % len(styles)], label=m,
               markerfacecolor="none" if i % 2 else None)
    a.set_xlabel("MoE layer (predicted)")
    a.set_ylabel("hit rate (recall@k)")
    a.set_title("prediction hit rate per layer, speculative decoding")
    a.legend()
    b.bar(modes, [100 * result["modes"][m]["perplexity_change"] for m in modes])
    b.set_ylabel("perplexity change vs exact (%)")
    b.set_title(f"{result['sequences']} x {result['seq_len']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
