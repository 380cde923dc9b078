"""`infer`: generate text or benchmark modes with offloaded experts.

    infer generate "To be, or not to be" --estimators checkpoints/demo-estimator-h1 --prefetch hybrid
    infer bench --estimators checkpoints/demo-estimator-h1 --modes none+fetch,hybrid+fetch,hybrid+speculate
    infer eval --estimators checkpoints/demo-estimator-h1 --modes quasi,learned,hybrid
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from specmoe.errors import SpecmoeError, cli_errors

from .config import CACHE_FILLS, DEFAULT_CONFIG_PATH, ON_MISS, load_config
from .eviction import POLICIES
from .predict import MODES

_RUNTIME_OPTIONS = ("model", "estimators", "default_vectors", "device", "dtype", "gpu_expert_budget", "prefetch",
                    "on_miss", "eviction", "lookahead", "max_context", "cpu_threads",
                    "cpu_copy_share", "cpu_demand_share", "prefetch_window", "host_read_share", "cache_fill")


def _share_or_auto(text: str):
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or auto, got {text!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help=f"YAML settings (default: {DEFAULT_CONFIG_PATH.name} in configs/)")
    p.add_argument("--model", default=None, help="hub id or local directory (default: the bundled demo model)")
    p.add_argument("--estimators", default=None, help="estimator checkpoint made by `train` (learned, hybrid)")
    p.add_argument("--default-vectors", default=None, help="a complete trace whose default vectors quasi uses")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, help="auto keeps the checkpoint's dtype; bf16, fp16, fp32")
    p.add_argument("--gpu-expert-budget", default=None,
                   help="GPU memory for experts: bytes (8GiB), or a share of all expert bytes (25%%); 0 = minimum")
    p.add_argument("--prefetch", default=None, choices=("auto",) + MODES,
                   help="what predicts the experts of coming layers (default: auto: hybrid with --estimators, "
                        "else quasi with --default-vectors, else current)")
    p.add_argument("--on-miss", default=None, choices=ON_MISS,
                   help="speculate: run the predicted experts; fetch: exact, copy what is missing; cpu: exact, "
                        "compute what is missing on the CPU; auto: exact, cpu or fetch, whichever serves a "
                        "layer's misses sooner on this machine, measured at start (default: auto)")
    p.add_argument("--eviction", default=None, choices=tuple(POLICIES), help="GPU expert cache policy (default: lru)")
    p.add_argument("--lookahead", type=int, default=None, help="layers ahead (default: the estimator's, else 1)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache length in tokens (default: 4096)")
    p.add_argument("--cpu-threads", type=int, default=None, help="threads for CPU experts (default: torch's)")
    p.add_argument("--prefetch-window", type=int, default=None,
                   help="exact modes: predicted copies in flight at once; the others wait, and are dropped when "
                        "the true routing contradicts them before their turn (default: 0, all at once)")
    p.add_argument("--cpu-copy-share", type=float, default=None,
                   help="--on-miss cpu: share of the predicted experts not on the GPU that are copied ahead; the CPU "
                        "computes the rest (default: starts at copy bandwidth / (copy + CPU expert bandwidth), measured, then "
                        "follows the host while decoding)")
    p.add_argument("--cpu-demand-share", type=float, default=None,
                   help="--on-miss cpu: share of a layer's missed experts copied as soon as its routing is read and "
                        "computed by the GPU while the CPU computes the rest (default: 0, the CPU computes every miss)")
    p.add_argument("--host-read-share", type=_share_or_auto, default=None,
                   help="exact decode: share of a layer's missed experts the GPU computes by reading their weights "
                        "in place in host memory over PCIe, beside the CPU (cpu) or the copies (fetch); auto: "
                        "with --on-miss cpu on a GPU, measured at start; else 0 (default: auto)")
    p.add_argument("--cache-fill", default=None, choices=CACHE_FILLS,
                   help="what the expert slots hold after a prompt: prompt, each layer's experts it used most; "
                        "recent, what its last copies left, the last layers whole (default: prompt)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream generated text")
    g.add_argument("prompt", nargs="?", default=None, help="prompt text; '-' or nothing reads stdin")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop once the text contains this (repeatable)")
    g.add_argument("--telemetry", default=None, help="also write the telemetry as JSON to this file")
    _common(g)
    b = sub.add_parser("bench", help="modes side by side: time per token beside the copy floor")
    b.add_argument("--modes", default="auto+auto,none+fetch,current+fetch,none+cpu,current+speculate",
                   help="PREFETCH+ON_MISS, comma-separated (default: %(default)s)")
    b.add_argument("--budgets", default="0", help="GPU expert budgets, comma-separated (default: %(default)s)")
    b.add_argument("--prompt-tokens", type=int, default=256, help="(default: %(default)s)")
    b.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per mode (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=4, help="decoded tokens not timed (default: %(default)s)")
    b.add_argument("--out", default="runs/bench", help="directory for bench.json and bench.md (default: %(default)s)")
    _common(b)
    ev = sub.add_parser("eval", help="what speculation costs in accuracy: every mode against the exact model")
    ev.add_argument("--modes", default=None,
                    help="speculative predictors, comma-separated (default: quasi,learned,hybrid with --estimators, "
                         "else current,quasi)")
    ev.add_argument("--dataset", default=None, help="any input trace accepts (default: the bundled demo corpus)")
    ev.add_argument("--split", default="test", help="(default: %(default)s)")
    ev.add_argument("--text-field", default="text", help="(default: %(default)s)")
    ev.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    ev.add_argument("--max-tokens", type=int, default=16384, help="tokens evaluated (default: %(default)s)")
    ev.add_argument("--exact-prefix", type=int, default=0,
                    help="first tokens of each sequence run exactly, as a prefill would (default: %(default)s)")
    ev.add_argument("--whole-model", action="store_true",
                    help="hold the whole model on the device(s) instead of offloading its experts; with "
                         "--device auto and several GPUs it is spread over them (device_map=auto)")
    ev.add_argument("--out", default="runs/eval", help="directory for eval.json, eval.md, eval.png (default: %(default)s)")
    _common(ev)
    return parser


def runtime_config(args: argparse.Namespace):
    return load_config(args.config, **{k: getattr(args, k) for k in _RUNTIME_OPTIONS})


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise SpecmoeError(f"prompt file {path} does not exist")
        return path.read_text(encoding="utf-8")
    if args.prompt in (None, "-"):
        if sys.stdin is None or sys.stdin.isatty():
            raise SpecmoeError("give a prompt: as an argument, with --prompt-file, or on stdin")
        return sys.stdin.read()
    return args.prompt


def run_generate(args: argparse.Namespace) -> dict:
    from . import load
    from .engine import make_sampler
    from .telemetry import format_summary, write_json

    config = runtime_config(args)
    text = read_prompt(args)
    if args.max_new_tokens < 1:
        raise SpecmoeError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    sampler = make_sampler(args.temperature, args.top_p, args.seed)
    engine = load(config, progress=not args.quiet)
    tok = engine.tokenizer
    if tok is None:
        raise SpecmoeError(f"{config.model} has no tokenizer; infer generate needs one")
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise SpecmoeError("--chat: this tokenizer has no chat template")
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
    else:
        ids = tok(text, add_special_tokens=True)["input_ids"]
    if len(ids) + args.max_new_tokens > engine.max_context:
        raise SpecmoeError(f"the prompt ({len(ids)} tokens) plus {args.max_new_tokens} new tokens exceed the context "
                           f"of {engine.max_context} tokens (raise --max-context or shorten the prompt)")
    stops = list(args.stop)
    produced: list[int] = []
    shown = ""

    def stop(tokens):
        return bool(stops) and any(s in tok.decode(tokens) for s in stops)

    try:
        for token in engine.generate(torch.tensor(ids), args.max_new_tokens, sampler=sampler, stop=stop):
            if token == tok.eos_token_id:
                break
            produced.append(token)
            full = tok.decode(produced, skip_special_tokens=True)
            sys.stdout.write(full[len(shown):])
            sys.stdout.flush()
            shown = full
        sys.stdout.write("\n")
    finally:
        engine.close()
    summary = engine.telemetry.summary()
    summary["engine"] = engine.info
    print(format_summary(summary), file=sys.stderr)
    if args.telemetry:
        write_json(Path(args.telemetry), summary)
    return summary


def bench_prompt(tokenizer, n: int) -> torch.Tensor:
    """A fixed prompt: the first `n` tokens of the bundled corpus's test split (random ids
    with a fixed seed when the model has no tokenizer)."""
    if tokenizer is None:
        return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    from specmoe.corpus import load_text_dataset

    ds = load_text_dataset(None, split="test")
    ids: list[int] = []
    for row in ds:
        ids.extend(tokenizer(row["text"], add_special_tokens=False, verbose=False)["input_ids"])
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise SpecmoeError(f"the demo corpus's test split has fewer than {n} tokens")
    return torch.tensor(ids[:n])


def run_bench(args: argparse.Namespace) -> dict:
    from .bench import bench, markdown, mode_runs, parse_modes
    from .build import load_parts
    from .telemetry import write_json

    config = runtime_config(args)
    modes = parse_modes(args.modes)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if args.prompt_tokens < 1:
        raise SpecmoeError("--prompt-tokens must be at least 1")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpecmoeError(f"--out {out} is a file, not a directory")
    need = args.prompt_tokens + args.decode_tokens + 2
    if config.max_context < need:
        config = dataclasses.replace(config, max_context=need)
    parts = load_parts(config, progress=not args.quiet)
    prompt = bench_prompt(parts.tokenizer, args.prompt_tokens)
    result = bench(parts, config, mode_runs(config, modes, budgets), prompt, args.decode_tokens, args.warmup,
                   progress=not args.quiet)
    command = "infer bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", {**result, "command": command})
    md = markdown(result, command)
    (out / "bench.md").write_text(md, encoding="utf-8")
    print(md)
    return result


def run_eval(args: argparse.Namespace) -> dict:
    from specmoe.corpus import load_text_dataset
    from specmoe.tokens import pack_rows

    from .build import load_parts
    from .evaluate import evaluate, markdown, plot
    from .telemetry import write_json

    config = runtime_config(args)
    if args.modes is None:
        modes = ["quasi", "learned", "hybrid"] if config.estimators else ["current", "quasi"]
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    needs = [m for m in modes if m in ("learned", "hybrid")]
    if needs and not config.estimators:
        raise SpecmoeError(f"mode {needs[0]} needs trained estimators: pass --estimators DIR (made by `train`)")
    if "quasi" in modes and not (config.estimators or config.default_vectors):
        raise SpecmoeError("mode quasi needs default vectors: pass --estimators DIR or --default-vectors TRACE")
    if args.seq_len < 2 or args.max_tokens < args.seq_len:
        raise SpecmoeError(f"need --seq-len >= 2 and --max-tokens >= --seq-len (got {args.seq_len}, {args.max_tokens})")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpecmoeError(f"--out {out} is a file, not a directory")
    dataset = load_text_dataset(args.dataset, split=args.split, text_field=args.text_field)
    if args.whole_model:
        from .evaluate import evaluate_resident

        model, tokenizer, name = _whole_model(config)
        if tokenizer is None:
            raise SpecmoeError("this model has no tokenizer; infer eval needs one")
        rows = pack_rows(dataset, tokenizer, args.text_field, args.seq_len, args.max_tokens)
        result = evaluate_resident(model, config, modes, rows, args.exact_prefix, progress=not args.quiet)
        result["devices"] = sorted({str(p.device) for p in model.parameters()})
    else:
        parts = load_parts(config, progress=not args.quiet)
        if parts.tokenizer is None:
            raise SpecmoeError("this model has no tokenizer; infer eval needs one")
        rows = pack_rows(dataset, parts.tokenizer, args.text_field, args.seq_len, args.max_tokens)
        result = evaluate(parts, config, modes, rows, args.exact_prefix, progress=not args.quiet)
        name = parts.info.get("model")
    result.update({"model": name, "dataset": args.dataset or "the demo corpus", "whole_model": args.whole_model,
                   "split": args.split, "estimators": config.estimators,
                   "command": "infer eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    md = markdown(result)
    (out / "eval.md").write_text(f"    {result['command']}\n\n" + md, encoding="utf-8")
    plot(result, out / "eval.png")
    print(md)
    return result


def _whole_model(config):
    """The model with its experts, on one device, or over every GPU (device_map=auto) when
    --device auto finds several."""
    import torch

    from specmoe.paths import display_path
    from specmoe.skeleton import load_skeleton

    from .build import resolve_device

    if config.device == "auto" and torch.cuda.device_count() > 1:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from specmoe.checkpoint_reader import resolve_checkpoint_dir
        from specmoe.models import resolve_dtype

        path = resolve_checkpoint_dir(config.model)
        dtype = resolve_dtype(config.dtype, "cuda")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto").eval()
        return model, AutoTokenizer.from_pretrained(path), display_path(path)
    skeleton = load_skeleton(config.model, device=str(resolve_device(config.device)), dtype=config.dtype,
                             experts="modules")
    return skeleton.model, skeleton.tokenizer, display_path(skeleton.reader.path)


@cli_errors("infer")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    {"generate": run_generate, "bench": run_bench, "eval": run_eval}[args.command](args)
    return 0
