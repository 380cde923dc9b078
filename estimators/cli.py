"""`train`: fit and evaluate expert-routing predictors on traces, write a checkpoint and report.

    train --traces runs/demo/trace-train --eval-traces runs/demo/trace-test --out checkpoints/demo-est
    train --traces T1 T2 --predictor quasi --lookahead 2 --out checkpoints/quasi-h2
    train --evaluate checkpoints/demo-est --eval-traces runs/other-trace --out runs/demo-est-on-other
    python -m estimators --traces T --out OUT --max-steps 200 --device cuda

--predictor all (default) trains `learned`, evaluates current / quasi / learned /
hybrid / previous and deploys the hybrid choice; learned / quasi / current deploy
that predictor on every layer (only `learned` trains). Output in --out:
estimator.safetensors + config.json (the checkpoint, config.json written last),
report.json, report.md, recall_per_layer.png, and Lightning's CSV log and best
checkpoint under lightning/. `--evaluate CKPT` trains nothing: it scores an existing
checkpoint on --eval-traces and writes the same report into --out.

From Python, the command is `run_train(TrainRun(...))` / `run_evaluate(EvaluateRun(...))`
with an EstimatorConfig inside (`estimators.config`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from specmoe.errors import MismatchError, SpecmoeError, cli_errors
from specmoe.paths import display_path

from .config import EstimatorConfig, load_config

PREDICTOR_CHOICES = ("all", "learned", "quasi", "current")
# flags that only mean something when training (refused with --evaluate)
_TRAIN_ONLY = ("traces", "predictor", "lookahead", "max_steps", "max_epochs", "width", "depth", "add_shared",
               "routing_features", "normed_features", "skip_existing")


@dataclasses.dataclass
class TrainRun:
    """What one `train` run does: the estimator settings plus where to read and write."""

    traces: list[Path]
    out: Path
    estimator: EstimatorConfig = dataclasses.field(default_factory=EstimatorConfig)
    eval_traces: list[Path] = dataclasses.field(default_factory=list)
    predictor: str = "all"          # all | learned | quasi | current
    lookahead: int = 1
    model: str | None = None        # hub id or directory (default: the id in the trace manifest)
    verify: bool | None = None      # sha256 the shards (default: estimator.verify_traces)
    overwrite: bool = False         # replace an estimator already in `out`
    skip_existing: bool = False     # leave a complete estimator of the same settings in `out` alone
    quiet: bool = False             # no progress and no notes on stderr

    def __post_init__(self) -> None:
        self.traces = [Path(t) for t in self.traces]
        self.eval_traces = [Path(t) for t in self.eval_traces or []]
        self.out = Path(self.out)


@dataclasses.dataclass
class EvaluateRun:
    """Score an existing estimator checkpoint on other traces, without training."""

    checkpoint: Path
    eval_traces: list[Path]
    out: Path                       # report directory
    estimator: EstimatorConfig = dataclasses.field(default_factory=EstimatorConfig)  # batch sizes, device
    model: str | None = None        # hub id or directory (default: the id the checkpoint records)
    verify: bool | None = None
    overwrite: bool = False         # replace a report already in `out`
    quiet: bool = False

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.eval_traces = [Path(t) for t in self.eval_traces or []]
        self.out = Path(self.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train", description="Train and evaluate expert-routing predictors on traces.")
    p.add_argument("--traces", nargs="+", metavar="DIR", help="training trace directories")
    p.add_argument("--eval-traces", nargs="+", metavar="DIR", help="separate held-out trace(s) to report on")
    p.add_argument("--evaluate", type=Path, metavar="CKPT",
                   help="train nothing: evaluate the estimator checkpoint CKPT on --eval-traces, report into --out")
    p.add_argument("--predictor", choices=PREDICTOR_CHOICES, default=None,
                   help="all (default): train learned, evaluate every predictor, deploy the hybrid; "
                        "learned / quasi / current: deploy that one on every layer")
    p.add_argument("--lookahead", type=int, default=None, metavar="H",
                   help="predict the MoE layer H MoE layers ahead (default: 1)")
    p.add_argument("--out", type=Path, required=True,
                   help="checkpoint directory, e.g. checkpoints/NAME (with --evaluate: the report directory)")
    p.add_argument("--model", help="hub id or model directory (default: the model id in the trace manifest)")
    p.add_argument("--config", type=Path, help="estimator YAML config (default: configs/estimator.yaml)")
    p.add_argument("--max-steps", type=int, help="override the config's max_steps")
    p.add_argument("--max-epochs", type=int, help="override the config's max_epochs")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override the config's device")
    p.add_argument("--devices", help="override the config's devices (an int, or auto)")
    p.add_argument("--width", type=int,
                   help="correction-net width (default: the config's; auto = the widest up to max_width "
                        "within max_param_share)")
    p.add_argument("--add-shared", action="store_true", help="add the shared expert's output to the quasi state")
    p.add_argument("--routing-features", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's routing_features (correction nets also read layer l's routing)")
    p.add_argument("--normed-features", action=argparse.BooleanOptionalAction, default=None,
                   help="override the config's normed_features (correction nets also read s_l)")
    p.add_argument("--depth", type=int, help="override the config's correction-net depth")
    p.add_argument("--seed", type=int, help="override the config's seed")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the trace shards")
    p.add_argument("--overwrite", action="store_true", help="replace an estimator (or report) already in --out")
    p.add_argument("--skip-existing", action="store_true",
                   help="if --out already holds a complete estimator made with the same traces, lookahead and "
                        "predictor, leave it and exit 0 (any other estimator there is still refused)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display and no notes on stderr")
    return p


def run_config(args: argparse.Namespace) -> TrainRun | EvaluateRun:
    """The run an argparse namespace of build_parser() asks for (SpecmoeError when inconsistent)."""
    cfg = load_config(args.config, max_steps=args.max_steps, max_epochs=args.max_epochs, device=args.device,
                      devices=_devices_arg(args.devices), width=args.width, depth=args.depth, seed=args.seed,
                      routing_features=args.routing_features, normed_features=args.normed_features,
                      add_shared=True if args.add_shared else None)
    verify = False if args.no_verify else None
    if args.evaluate is not None:
        given = [f"--{name.replace('_', '-')}" for name in _TRAIN_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise SpecmoeError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to training; "
                               "--evaluate CKPT reads --eval-traces and writes its report into --out")
        if not args.eval_traces:
            raise SpecmoeError("--evaluate CKPT needs --eval-traces DIR [DIR ...] to evaluate it on")
        return EvaluateRun(checkpoint=args.evaluate, eval_traces=args.eval_traces, out=args.out, estimator=cfg,
                           model=args.model, verify=verify, overwrite=args.overwrite, quiet=args.quiet)
    if not args.traces:
        raise SpecmoeError("give --traces DIR [DIR ...] to train on (or --evaluate CKPT to evaluate a checkpoint)")
    if args.overwrite and args.skip_existing:
        raise SpecmoeError("--overwrite and --skip-existing contradict each other; choose one")
    return TrainRun(traces=args.traces, out=args.out, estimator=cfg, eval_traces=args.eval_traces or [],
                    predictor=args.predictor or "all", lookahead=1 if args.lookahead is None else args.lookahead,
                    model=args.model, verify=verify, overwrite=args.overwrite, skip_existing=args.skip_existing,
                    quiet=args.quiet)


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


def _note(run, message: str) -> None:
    """One line on stderr about what the run is doing (not with quiet)."""
    if not run.quiet:
        print(f"train: {message}", file=sys.stderr, flush=True)


def _progress(run, iterable, total: int, desc: str):
    """`iterable` with a transient tqdm bar on stderr (plain when quiet or progress_bar is off)."""
    if run.quiet or not run.estimator.progress_bar:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)


def choose_width(cfg: EstimatorConfig, *, inputs: int, experts: int, targets: int, default_vector_entries: int,
                 expert_params: int) -> tuple[int, str | None]:
    """(width, note): the configured width, or with width "auto" the widest up to max_width
    whose estimator (correction nets + default vectors) stays within max_param_share of the
    expert parameters, and a line saying so (SpecmoeError when not even width 1 fits)."""
    from .predictors import correction_parameter_count

    if cfg.width != "auto":
        return int(cfg.width), None
    budget = cfg.max_param_share * max(1, expert_params)

    def share(w: int) -> float:
        total = default_vector_entries + targets * correction_parameter_count(inputs, experts, w, cfg.depth)
        return total / max(1, expert_params)

    for w in range(cfg.max_width, 0, -1):
        if share(w) * max(1, expert_params) <= budget:
            note = (f"width {w}: the widest up to max_width={cfg.max_width} within max_param_share="
                    f"{cfg.max_param_share} ({100 * share(w):.2f}% of the model's {expert_params:,} expert parameters")
            if w < cfg.max_width:
                note += f"; width {cfg.max_width} would hold {100 * share(cfg.max_width):.2f}%"
            return w, note + ")"
    raise SpecmoeError(
        f"no correction net fits in max_param_share={cfg.max_param_share}: the default vectors alone hold "
        f"{100 * default_vector_entries / max(1, expert_params):.2f}% of the model's {expert_params:,} expert "
        f"parameters and width 1 would make it {100 * share(1):.2f}%; raise max_param_share in the config, "
        "or train --predictor quasi")


def _existing_estimator(run: TrainRun) -> dict | None:
    """What is already in --out: None (nothing, or --overwrite), or the config of a complete
    estimator made with this run's traces, lookahead and predictor (--skip-existing);
    anything else there is refused with one line."""
    from .checkpoint import CONFIG_FILE, check_weights, read_config
    from .report import REPORT_JSON

    out = run.out
    if out.exists() and not out.is_dir():
        raise SpecmoeError(f"--out {out} exists and is not a directory")
    if not (out / CONFIG_FILE).exists() or run.overwrite:
        return None
    if not run.skip_existing:
        raise SpecmoeError(f"{out} already holds an estimator; use --overwrite to replace it, --skip-existing "
                           "to keep it when it was made with the same settings, or another --out")
    cfg = read_config(out)
    check_weights(out, cfg)
    training = cfg.get("training") or {}
    wanted = {"lookahead": run.lookahead, "predictor": run.predictor,
              "traces": [str(Path(t).resolve()) for t in run.traces],
              "eval traces": [str(Path(t).resolve()) for t in run.eval_traces],
              "trace tokens": _trace_tokens(run.traces + run.eval_traces)}
    have = {"lookahead": cfg.get("lookahead"), "predictor": training.get("predictor"),
            "traces": [str(Path(t).resolve()) for t in training.get("traces") or []],
            "eval traces": [str(Path(t).resolve()) for t in training.get("eval_traces") or []],
            "trace tokens": training.get("trace_tokens")}
    for key, value in wanted.items():
        if have[key] is not None and have[key] != value:
            shown = (lambda v: ", ".join(display_path(t) for t in v) or "none") if "traces" in key else str
            raise SpecmoeError(f"{out} holds an estimator made with other settings ({key} {shown(have[key])}, "
                               f"not {shown(value)}); use --overwrite to replace it, or another --out")
    if not (out / REPORT_JSON).is_file():
        return None     # the checkpoint is there but its report is not: run again and write both
    return cfg


def _trace_tokens(paths) -> list[int | None]:
    """Tokens in each trace (None where it cannot be read): a trace grown since is another trace."""
    from tracing import TraceReader

    out = []
    for p in paths:
        try:
            out.append(int(TraceReader(p).num_tokens))
        except Exception:  # noqa: BLE001 - a missing or damaged trace differs from any recorded one
            out.append(None)
    return out


def run_train(run: TrainRun) -> dict | None:
    """The whole `train` command; returns what main() prints (None on DDP ranks other than 0).
    With skip_existing and a complete estimator of the same settings in run.out, returns
    {"skipped": True, "out": ...} without training."""
    import lightning as L

    from .checkpoint import router_fingerprint, save_estimator
    from .data import (Source, check_same_model, check_trace_against_model, make_loader,
                       merged_default_vectors, open_traces, split_sequences, PairBatches)
    from .evaluate import choose_hybrid, compose_hybrid, evaluate, order_predictors
    from .predictors import Estimator, collect_parts, expert_parameter_count, layer_pairs
    from .report import write_report
    from .checkpoint import load_routing_model

    t0 = time.time()
    _quiet_loading()
    cfg = run.estimator.validate()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if run.predictor not in PREDICTOR_CHOICES:
        raise SpecmoeError(f"predictor {run.predictor!r} is not one of {', '.join(PREDICTOR_CHOICES)}")
    if run.lookahead < 1:
        raise SpecmoeError(f"--lookahead must be at least 1 (got {run.lookahead})")
    if run.overwrite and run.skip_existing:
        raise SpecmoeError("--overwrite and --skip-existing contradict each other; choose one")
    out: Path = run.out
    if _existing_estimator(run) is not None:
        return {"skipped": True, "out": out}

    verify = cfg.verify_traces if run.verify is None else run.verify
    readers = open_traces(run.traces, verify=verify)
    manifest_model = check_same_model(readers)
    eval_readers = open_traces(run.eval_traces, verify=verify) if run.eval_traces else []
    if eval_readers:
        check_same_model(readers[:1] + eval_readers)

    model_id = run.model or manifest_model.get("id")
    if not model_id:
        raise SpecmoeError(f"the trace manifest at {readers[0].path} names no model; pass --model")
    model = load_routing_model(model_id, cfg.model_dtype)
    from specmoe.families import detect_family

    family = detect_family(model)
    spec = family.spec(model)
    fingerprint = router_fingerprint(model, family)

    traced = _common_layers(readers)
    pairs = layer_pairs(spec.moe_layers, traced, run.lookahead)
    if not pairs:
        raise SpecmoeError(
            f"--lookahead {run.lookahead} is too large for the traced layers: the traces hold MoE layers "
            f"{traced} of {len(spec.moe_layers)}, and no traced layer has a traced layer {run.lookahead} "
            "MoE layer(s) after it")
    needed = sorted({l for p in pairs for l in p})
    for r in eval_readers:
        missing = sorted(set(needed) - set(r.layers))
        if missing:
            raise SpecmoeError(f"the eval trace at {r.path} lacks layers {missing} that the predictors need")
    for r in readers + eval_readers:
        check_trace_against_model(r, model, family, spec, fingerprint, layers=needed)

    learned = run.predictor in ("all", "learned")
    sources = sorted({s for s, _ in pairs})
    expert_params = expert_parameter_count(model, family)
    inputs = (spec.hidden_size + (spec.num_experts if cfg.routing_features else 0)
              + (spec.hidden_size if cfg.normed_features else 0))
    if learned:
        width, width_note = choose_width(cfg, inputs=inputs, experts=spec.num_experts, targets=len(pairs),
                                         default_vector_entries=len(sources) * spec.num_experts * spec.hidden_size,
                                         expert_params=expert_params)
    else:
        width, width_note = (cfg.max_width if cfg.width == "auto" else int(cfg.width)), None
    if width_note:
        _note(run, width_note)

    L.seed_everything(cfg.seed, workers=True, verbose=False)   # before the correction nets are initialised
    default_vectors = merged_default_vectors(readers, sources)
    parts = collect_parts(model, family, pairs, cfg.add_shared)
    meta = {"id": display_path(model_id), "model_type": spec.model_type, "moe_layers": list(spec.moe_layers),
            "fingerprint": fingerprint}
    est = Estimator(family, pairs=pairs, default_vectors=default_vectors, parts=parts,
                    num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden_size,
                    lookahead=run.lookahead, width=width, depth=cfg.depth, activation=cfg.activation,
                    add_shared=cfg.add_shared, routing_features=cfg.routing_features,
                    normed_features=cfg.normed_features, learned=learned, meta=meta)
    counts = est.parameter_counts()
    share = counts["total"] / max(1, expert_params)
    if share > cfg.max_param_share:
        raise SpecmoeError(
            f"the estimator would hold {counts['total']:,} parameters ({100 * share:.2f}% of the model's "
            f"{expert_params:,} expert parameters), above max_param_share={cfg.max_param_share}; "
            "lower --width (or leave width at auto: the widest that fits), lower depth, "
            "or set routing_features / normed_features to false")
    est.meta["parameters"] = {**counts, "expert": int(expert_params), "share": share}
    del model  # only the copied norms/routers are needed from here on

    val_masks = [split_sequences(r.num_sequences, cfg.val_fraction, cfg.seed, salt=i) for i, r in enumerate(readers)]
    train_sources = [Source(str(r.path), ~m) for r, m in zip(readers, val_masks)]
    val_sources = [Source(str(r.path), m) for r, m in zip(readers, val_masks)]
    training: dict = {"traces": [str(r.path) for r in readers],
                      "eval_traces": [str(r.path) for r in eval_readers],
                      "trace_tokens": [int(r.num_tokens) for r in readers + eval_readers],
                      "predictor": run.predictor, "width": width, "width_auto": cfg.width == "auto",
                      "train_tokens": sum(int((~m).sum()) * r.seq_len for r, m in zip(readers, val_masks)),
                      "val_tokens": sum(int(m.sum()) * r.seq_len for r, m in zip(readers, val_masks)),
                      "config": cfg.to_dict()}
    from .training import TraceDataModule, resolve_hardware

    hw = resolve_hardware(cfg)
    dm = TraceDataModule(train_sources, val_sources, pairs, cfg, pin_memory=hw["accelerator"] == "gpu")
    if learned:
        from .training import EstimatorModule, build_trainer

        batches = dm.train_set(0).batches_for(0, hw["devices"])
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        try:   # Trainer(deterministic=True) switches deterministic algorithms on for the whole process
            trainer = build_trainer(cfg, out, hw, batches, progress=cfg.progress_bar and not run.quiet)
            module = EstimatorModule(est, cfg)
            trainer.fit(module, datamodule=dm)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
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
             "quasi": ["quasi"], "current": ["current"]}[run.predictor]
    results: dict[str, dict] = {}
    val_set = dm.val_set(with_previous="previous" in names, distributed=False)
    val_metrics, val_kl = evaluate(est, _progress(run, make_loader(val_set), len(val_set), "evaluate validation"),
                                   names, device)
    results["validation"] = val_metrics
    if eval_readers:
        eval_set = PairBatches([Source(str(r.path)) for r in eval_readers], pairs, cfg.eval_batch_size,
                               with_previous="previous" in names, buffer_mb=cfg.buffer_mb,
                               num_workers=cfg.num_workers, distributed=False)
        results["eval"], _ = evaluate(est, _progress(run, make_loader(eval_set), len(eval_set), "evaluate eval"),
                                      names, device)

    if run.predictor == "all":
        choice = choose_hybrid(val_metrics)
        est.hybrid = choice
        est.set_kinds(choice)
        for split in results:
            results[split]["hybrid"] = compose_hybrid(results[split], choice)
    else:
        est.set_kinds({t: run.predictor for t in est.targets})
    for split in results:
        results[split] = {n: results[split][n] for n in order_predictors(results[split])}

    training["seconds"] = time.time() - t0
    training["val_kl"] = {k: {str(t): v for t, v in per.items()} for k, per in val_kl.items()}
    est.to("cpu")
    report_meta = {
        "model": {"id": display_path(model_id), "family": spec.family, "num_experts": spec.num_experts,
                  "top_k": spec.top_k, "fingerprint": fingerprint},
        "lookahead": run.lookahead, "pairs": [list(p) for p in pairs],
        "predictor": run.predictor, "deployed": {str(t): k for t, k in est.kinds.items()},
        "hybrid": None if est.hybrid is None else {str(t): k for t, k in est.hybrid.items()},
        "parameters": est.meta["parameters"], "training": training,
        "traces": {"validation": [display_path(r.path) for r in readers],
                   "eval": [display_path(r.path) for r in eval_readers]},
    }
    paths = write_report(out, results, report_meta)
    # config.json last: its presence marks a complete estimator (see --skip-existing)
    save_estimator(est, out, metrics=_summary(results), extra={"training": training})
    return {"results": results, "paths": paths, "out": out, "estimator": est, "training": training,
            "parameters": est.meta["parameters"], "width_note": width_note}


def run_evaluate(run: EvaluateRun) -> dict:
    """Score the estimator checkpoint run.checkpoint on run.eval_traces (the true routing of each
    source layer fed in, as in training's report) and write report.json / report.md / the plot
    into run.out. A checkpoint made for another model than the traces': MismatchError."""
    from specmoe.families import detect_family

    from .checkpoint import check_weights, load_estimator, load_routing_model, read_config
    from .data import PairBatches, Source, check_same_model, check_trace_against_model, make_loader, open_traces
    from .evaluate import compose_hybrid, evaluate, order_predictors
    from .report import REPORT_JSON, write_report
    from .training import resolve_hardware

    t0 = time.time()
    _quiet_loading()
    cfg = run.estimator.validate()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    ck = read_config(run.checkpoint)
    check_weights(run.checkpoint, ck)
    out = run.out
    if out.exists() and not out.is_dir():
        raise SpecmoeError(f"--out {out} exists and is not a directory")
    if (out / REPORT_JSON).exists() and not run.overwrite:
        raise SpecmoeError(f"{out} already holds a report; use --overwrite to replace it, or another --out")
    if not run.eval_traces:
        raise SpecmoeError("evaluation needs at least one trace (--eval-traces)")
    verify = cfg.verify_traces if run.verify is None else run.verify
    readers = open_traces(run.eval_traces, verify=verify)
    manifest_model = check_same_model(readers)
    where = f"the estimator in {run.checkpoint}"
    fp, trace_fp = ck["model"].get("fingerprint"), manifest_model.get("fingerprint")
    if fp and trace_fp and fp != trace_fp:
        raise MismatchError(f"{where} was made for another model than the trace at {readers[0].path} "
                            f"(router fingerprint {fp[:12]}... vs {trace_fp[:12]}...)")

    model_id = run.model
    if not model_id:   # the checkpoint's model, or the trace's where the recorded path has gone (same model)
        from specmoe.models import resolve_model_id

        named = [i for i in (ck["model"].get("id"), manifest_model.get("id")) if i]
        local = [i for i in named if Path(resolve_model_id(i)).expanduser().exists()]
        model_id = (local or named or [None])[0]
    if not model_id:
        raise SpecmoeError(f"neither {where} nor the trace names its model; pass --model")
    model = load_routing_model(model_id, cfg.model_dtype)
    hw = resolve_hardware(cfg)
    device = torch.device("cuda" if hw["accelerator"] == "gpu" else "cpu")
    est = load_estimator(run.checkpoint, model, device=device)
    family = detect_family(model)
    spec = family.spec(model)
    needed = sorted({l for p in est.pairs for l in p})
    for r in readers:
        missing = sorted(set(needed) - set(r.layers))
        if missing:
            raise SpecmoeError(f"the trace at {r.path} lacks layers {missing} that {where} needs")
        check_trace_against_model(r, model, family, spec, fp, layers=needed)
    del model

    names = ["current", "quasi"] + (["learned"] if len(est.corrections) else []) + ["previous"]
    eval_set = PairBatches([Source(str(r.path)) for r in readers], est.pairs, cfg.eval_batch_size,
                           with_previous=True, buffer_mb=cfg.buffer_mb, num_workers=cfg.num_workers,
                           distributed=False)
    metrics, kl = evaluate(est, _progress(run, make_loader(eval_set), len(eval_set), "evaluate"), names, device)
    if est.hybrid is not None:
        metrics["hybrid"] = compose_hybrid(metrics, est.hybrid)
    results = {"eval": {n: metrics[n] for n in order_predictors(metrics)}}
    parameters = ck.get("parameters") or est.parameter_counts()
    evaluation = {"checkpoint": display_path(run.checkpoint), "eval_traces": [str(r.path) for r in readers],
                  "kl": {k: {str(t): v for t, v in per.items()} for k, per in kl.items()},
                  "seconds": time.time() - t0}
    report_meta = {
        "model": {"id": ck["model"].get("id"), "family": spec.family, "num_experts": spec.num_experts,
                  "top_k": spec.top_k, "fingerprint": fp},
        "lookahead": est.lookahead, "pairs": [list(p) for p in est.pairs],
        "predictor": "evaluate", "deployed": {str(t): k for t, k in est.kinds.items()},
        "hybrid": None if est.hybrid is None else {str(t): k for t, k in est.hybrid.items()},
        "parameters": parameters, "evaluation": evaluation,
        "traces": {"eval": [display_path(r.path) for r in readers]},
    }
    paths = write_report(out, results, report_meta)
    return {"results": results, "paths": paths, "out": out, "estimator": est, "evaluation": evaluation,
            "parameters": parameters}


def print_summary(result: dict, file=None) -> None:
    from .report import render_tables

    file = sys.stdout if file is None else file
    if result.get("skipped"):
        print(f"{result['out']} already holds a complete estimator made with these settings; "
              "left as it is (--skip-existing)", file=file)
        return
    for split, per in result["results"].items():
        print(f"== {split} ==", file=file)
        print(render_tables(per, metrics=("recall",)), file=file)
        print(file=file)
    p = result["parameters"]
    paths = result["paths"]
    if "evaluation" in result:
        print(f"evaluated {result['evaluation']['checkpoint']} in {result['evaluation']['seconds']:.1f}s; "
              f"wrote {result['out']}: {paths['json'].name}, {paths['md'].name}, {paths['png'].name}", file=file)
        return
    tr = result["training"]
    steps = f"{tr['steps']} steps, " if "steps" in tr else ""
    width = f"width {tr['width']}{' (auto)' if tr.get('width_auto') else ''}, " if tr.get("steps") is not None else ""
    print(f"estimator: {width}{p['correction']:,} correction parameters + {p['default_vectors']:,} default-vector "
          f"entries = {100 * p['share']:.3f}% of {p['expert']:,} expert parameters; {steps}"
          f"{tr['seconds']:.1f}s", file=file)
    print(f"wrote {result['out']}: estimator.safetensors, config.json, {paths['json'].name}, "
          f"{paths['md'].name}, {paths['png'].name}", file=file)


@cli_errors("train")
def main(argv: list[str] | None = None) -> int:
    run = run_config(build_parser().parse_args(argv))
    result = run_evaluate(run) if isinstance(run, EvaluateRun) else run_train(run)
    if result is not None:
        print_summary(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
