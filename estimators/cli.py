"""`train`: fit and evaluate expert-routing predictors on traces, write a checkpoint and report.

    train --traces runs/demo/trace-train --eval-traces runs/demo/trace-test --out checkpoints/demo-est
    train --traces T1 T2 --predictor quasi --lookahead 2 --out checkpoints/quasi-h2
    python -m estimators --traces T --out OUT --max-steps 200 --device cuda

--predictor all (default) trains `learned`, evaluates current / quasi / learned /
hybrid / previous and deploys the hybrid choice; learned / quasi / current deploy
that predictor on every layer (only `learned` trains). Output in --out:
estimator.safetensors + config.json (the checkpoint), report.json, report.md,
recall_per_layer.png, and Lightning's CSV log and best checkpoint under lightning/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from specmoe.errors import SpecmoeError, cli_errors
from specmoe.paths import display_path

from .config import load_config

PREDICTOR_CHOICES = ("all", "learned", "quasi", "current")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="Train and evaluate expert-routing predictors on traces.")
    p.add_argument("--traces", nargs="+", required=True, metavar="DIR", help="training trace directories")
    p.add_argument("--eval-traces", nargs="+", metavar="DIR", help="separate held-out trace(s) to report on")
    p.add_argument("--predictor", choices=PREDICTOR_CHOICES, default="all",
                   help="all (default): train learned, evaluate every predictor, deploy the hybrid; "
                        "learned / quasi / current: deploy that one on every layer")
    p.add_argument("--lookahead", type=int, default=1, metavar="H",
                   help="predict the MoE layer H MoE layers ahead (default: 1)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory, e.g. checkpoints/NAME")
    p.add_argument("--model", help="hub id or model directory (default: the model id in the trace manifest)")
    p.add_argument("--config", type=Path, help="estimator YAML config (default: configs/estimator.yaml)")
    p.add_argument("--max-steps", type=int, help="override the config's max_steps")
    p.add_argument("--max-epochs", type=int, help="override the config's max_epochs")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override the config's device")
    p.add_argument("--devices", help="override the config's devices (an int, or auto)")
    p.add_argument("--width", type=int, help="override the config's correction-net width")
    p.add_argument("--add-shared", action="store_true", help="add the shared expert's output to the quasi state")
    p.add_argument("--routing-features", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's routing_features (correction nets also read layer l's routing)")
    p.add_argument("--normed-features", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's normed_features (correction nets also read s_l)")
    p.add_argument("--depth", type=int, help="override the config's correction-net depth")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the trace shards")
    p.add_argument("--overwrite", action="store_true", help="replace an estimator already in --out")
    return p


def _devices_arg(text: str | None):
    if text is None or text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise SpecmoeError(f"--devices {text!r}: give a number or auto") from None


def _common_layers(readers) -> list[int]:
    layers = set(readers[0].layers)
    for r in readers[1:]:
        layers &= set(r.layers)
    return sorted(layers)


def _summary(results) -> dict:
    """Compact metrics for config.json: mean and per-layer recall per split and predictor."""
    from .metrics import mean_over_layers

    out = {}
    for split, per in results.items():
        out[split] = {}
        for name, layers in per.items():
            if layers:
                mean = mean_over_layers(layers)
                out[split][name] = {"recall": mean.recall, "weighted_recall": mean.weighted_recall,
                                    "exact_match": mean.exact_match, "top1": mean.top1,
                                    "recall_per_layer": {str(t): m.recall for t, m in sorted(layers.items())}}
    return out


def _quiet_loading() -> None:
    """No weight-loading progress bars: the command's stderr is for errors."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def run_train(args: argparse.Namespace) -> dict | None:
    """The whole `train` command; returns what main() prints (None on DDP ranks other than 0)."""
    from specmoe.models import load_moe_model

    from .checkpoint import CONFIG_FILE, router_fingerprint, save_estimator
    from .data import (Source, check_same_model, check_trace_against_model, make_loader,
                       merged_default_vectors, open_traces, split_sequences, PairBatches)
    from .evaluate import choose_hybrid, compose_hybrid, evaluate, order_predictors
    from .predictors import Estimator, collect_parts, expert_parameter_count, layer_pairs
    from .report import write_report

    t0 = time.time()
    _quiet_loading()
    cfg = load_config(args.config, max_steps=args.max_steps, max_epochs=args.max_epochs, device=args.device,
                      devices=_devices_arg(args.devices), width=args.width, depth=args.depth,
                      routing_features=args.routing_features, normed_features=args.normed_features,
                      add_shared=True if args.add_shared else None)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if args.lookahead < 1:
        raise SpecmoeError(f"--lookahead must be at least 1 (got {args.lookahead})")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise SpecmoeError(f"--out {out} exists and is not a directory")
    if (out / CONFIG_FILE).exists() and not args.overwrite:
        raise SpecmoeError(f"{out} already holds an estimator; use --overwrite to replace it, or another --out")

    verify = cfg.verify_traces and not args.no_verify
    readers = open_traces(args.traces, verify=verify)
    manifest_model = check_same_model(readers)
    eval_readers = open_traces(args.eval_traces, verify=verify) if args.eval_traces else []
    if eval_readers:
        check_same_model(readers[:1] + eval_readers)

    model_id = args.model or manifest_model.get("id")
    if not model_id:
        raise SpecmoeError(f"the trace manifest at {readers[0].path} names no model; pass --model")
    loaded = load_moe_model(model_id, dtype=cfg.model_dtype, device="cpu")
    model, family, spec = loaded.model, loaded.family, loaded.spec
    fingerprint = router_fingerprint(model, family)

    traced = _common_layers(readers)
    pairs = layer_pairs(spec.moe_layers, traced, args.lookahead)
    if not pairs:
        raise SpecmoeError(
            f"--lookahead {args.lookahead} is too large for the traced layers: the traces hold MoE layers "
            f"{traced} of {len(spec.moe_layers)}, and no traced layer has a traced layer {args.lookahead} "
            "MoE layer(s) after it")
    needed = sorted({l for p in pairs for l in p})
    for r in eval_readers:
        missing = sorted(set(needed) - set(r.layers))
        if missing:
            raise SpecmoeError(f"the eval trace at {r.path} lacks layers {missing} that the predictors need")
    for r in readers + eval_readers:
        check_trace_against_model(r, model, family, spec, fingerprint, layers=needed)

    learned = args.predictor in ("all", "learned")
    sources = sorted({s for s, _ in pairs})
    default_vectors = merged_default_vectors(readers, sources)
    parts = collect_parts(model, family, pairs, cfg.add_shared)
    expert_params = expert_parameter_count(model, family)
    meta = {"id": display_path(model_id), "model_type": spec.model_type, "moe_layers": list(spec.moe_layers),
            "fingerprint": fingerprint}
    est = Estimator(family, pairs=pairs, default_vectors=default_vectors, parts=parts,
                    num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden_size,
                    lookahead=args.lookahead, width=cfg.width, depth=cfg.depth, activation=cfg.activation,
                    add_shared=cfg.add_shared, routing_features=cfg.routing_features,
                    normed_features=cfg.normed_features, learned=learned, meta=meta)
    counts = est.parameter_counts()
    share = counts["total"] / max(1, expert_params)
    if share > cfg.max_param_share:
        raise SpecmoeError(
            f"the estimator would hold {counts['total']:,} parameters ({100 * share:.2f}% of the model's "
            f"{expert_params:,} expert parameters), above max_param_share={cfg.max_param_share}; "
            "lower --width (or depth) in the config, or set routing_features / normed_features to false")
    est.meta["parameters"] = {**counts, "expert": int(expert_params), "share": share}
    del loaded, model  # only the copied norms/routers are needed from here on

    val_masks = [split_sequences(r.num_sequences, cfg.val_fraction, cfg.seed, salt=i) for i, r in enumerate(readers)]
    train_sources = [Source(str(r.path), ~m) for r, m in zip(readers, val_masks)]
    val_sources = [Source(str(r.path), m) for r, m in zip(readers, val_masks)]
    training: dict = {"traces": [str(r.path) for r in readers],
                      "eval_traces": [str(r.path) for r in eval_readers],
                      "train_tokens": sum(int((~m).sum()) * r.seq_len for r, m in zip(readers, val_masks)),
                      "val_tokens": sum(int(m.sum()) * r.seq_len for r, m in zip(readers, val_masks)),
                      "config": cfg.to_dict()}
    from .training import TraceDataModule, resolve_hardware

    hw = resolve_hardware(cfg, args.device)
    dm = TraceDataModule(train_sources, val_sources, pairs, cfg, pin_memory=hw["accelerator"] == "gpu")
    if learned:
        from .training import EstimatorModule, build_trainer

        torch.manual_seed(cfg.seed)
        batches = dm.train_set(0).batches_for(0, hw["devices"])
        trainer = build_trainer(cfg, out, hw, batches)
        module = EstimatorModule(est, cfg)
        trainer.fit(module, datamodule=dm)
        if not trainer.is_global_zero:
            return None
        est = module.best_estimator()
        training.update({
            "steps": int(trainer.global_step), "epochs": int(trainer.current_epoch),
            "hardware": {k: hw[k] for k in ("accelerator", "devices", "strategy", "precision")},
            "best_step_per_layer": {str(t): int(module.best_step[p]) for p, (_, t) in enumerate(est.pairs)},
            "csv_log": str(Path(trainer.logger.log_dir) / "metrics.csv"),
        })

    device = torch.device("cuda" if hw["accelerator"] == "gpu" else "cpu")
    est.to(device)
    names = {"all": ["current", "quasi", "learned", "previous"], "learned": ["quasi", "learned"],
             "quasi": ["quasi"], "current": ["current"]}[args.predictor]
    results: dict[str, dict] = {}
    val_metrics, val_kl = evaluate(est, make_loader(dm.val_set(with_previous="previous" in names, distributed=False)),
                                   names, device)
    results["validation"] = val_metrics
    if eval_readers:
        eval_set = PairBatches([Source(str(r.path)) for r in eval_readers], pairs, cfg.eval_batch_size,
                               with_previous="previous" in names, buffer_mb=cfg.buffer_mb,
                               num_workers=cfg.num_workers, distributed=False)
        results["eval"], _ = evaluate(est, make_loader(eval_set), names, device)

    if args.predictor == "all":
        choice = choose_hybrid(val_metrics)
        est.hybrid = choice
        est.set_kinds(choice)
        for split in results:
            results[split]["hybrid"] = compose_hybrid(results[split], choice)
    else:
        est.set_kinds({t: args.predictor for t in est.targets})
    for split in results:
        results[split] = {n: results[split][n] for n in order_predictors(results[split])}

    training["seconds"] = time.time() - t0
    training["val_kl"] = {k: {str(t): v for t, v in per.items()} for k, per in val_kl.items()}
    est.to("cpu")
    save_estimator(est, out, metrics=_summary(results), extra={"training": training})
    report_meta = {
        "model": {"id": display_path(model_id), "family": spec.family, "num_experts": spec.num_experts,
                  "top_k": spec.top_k, "fingerprint": fingerprint},
        "lookahead": args.lookahead, "pairs": [list(p) for p in pairs],
        "predictor": args.predictor, "deployed": {str(t): k for t, k in est.kinds.items()},
        "hybrid": None if est.hybrid is None else {str(t): k for t, k in est.hybrid.items()},
        "parameters": est.meta["parameters"], "training": training,
    }
    paths = write_report(out, results, report_meta)
    return {"results": results, "paths": paths, "out": out, "estimator": est, "training": training,
            "parameters": est.meta["parameters"]}


def print_summary(result: dict, file=None) -> None:
    from .report import render_tables

    file = sys.stdout if file is None else file
    for split, per in result["results"].items():
        print(f"== {split} ==", file=file)
        print(render_tables(per, metrics=("recall",)), file=file)
        print(file=file)
    p = result["parameters"]
    tr = result["training"]
    steps = f"{tr['steps']} steps, " if "steps" in tr else ""
    print(f"estimator: {p['correction']:,} correction parameters + {p['default_vectors']:,} default-vector "
          f"entries = {100 * p['share']:.3f}% of {p['expert']:,} expert parameters; {steps}"
          f"{tr['seconds']:.1f}s", file=file)
    paths = result["paths"]
    print(f"wrote {result['out']}: estimator.safetensors, config.json, {paths['json'].name}, "
          f"{paths['md'].name}, {paths['png'].name}", file=file)


@cli_errors("train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_train(args)
    if result is not None:
        print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
