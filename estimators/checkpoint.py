"""Estimator checkpoints: the public, versioned format a runtime loads.

    checkpoints/NAME/
        estimator.safetensors   corrections.{t}.{param}  correction-net weights per target layer t
                                default_vectors.{l}      D_l [E, H] float32 per source layer l
        config.json             see below
        report.json, report.md, recall_per_layer.png   (written by the train command)

config.json (format "specmoe-estimator", version 1):

    model        id, family, model_type, moe_layers, num_experts, top_k, hidden_size and
                 fingerprint = sha256 over every MoE layer's router weight, router bias and
                 selection (correction) bias, each rounded to bf16 (so a model loaded in
                 fp32 or bf16 gives the same fingerprint)
    lookahead    h; pairs: [[source, target], ...] decoder-layer indices
    predictor    deployed kind per target layer ("current" | "quasi" | "learned")
    hybrid       per target layer choice of the hybrid predictor, or null
    estimator    width, depth, activation, add_shared, routing_features, normed_features (what the
                 correction nets read besides q_l; absent = false, as written before they existed),
                 learned (whether corrections exist)
    parameters   correction / default-vector counts and their share of the expert parameters
    metrics      validation (and eval) metrics per predictor: mean and per layer
    weights_sha256   of estimator.safetensors

`load_estimator(path, model)` refuses (MismatchError, one line) a checkpoint made
for another model, and (CorruptFileError) one whose files are damaged. The router
fingerprint decides which model a checkpoint belongs to; the recorded id is
information (a copy of the model in another directory is the same model). `model` may
be a loaded model (its routed experts need not be materialised: only norms, routers and
shared experts are read, and copied) or a hub id / directory, which is then loaded
without its routed experts (specmoe.skeleton).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from specmoe.errors import CorruptFileError, MismatchError, SpecmoeError
from specmoe.format_json import read_format_json
from specmoe.safetensors_stream import save_tensors, sha256_file, write_text
from specmoe.families import router_fingerprint  # noqa: F401  (part of this module's API)

from .predictors import CorrectionNet, Estimator, collect_parts

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "WEIGHTS_FILE", "CONFIG_FILE", "router_fingerprint",
           "save_estimator", "load_estimator", "read_config", "check_weights", "load_routing_model"]

FORMAT_NAME = "specmoe-estimator"
FORMAT_VERSION = 1
WEIGHTS_FILE = "estimator.safetensors"
CONFIG_FILE = "config.json"


def estimator_tensors(estimator: Estimator) -> dict[str, torch.Tensor]:
    out = {}
    for t, net in estimator.corrections.items():
        for name, p in net.state_dict().items():
            out[f"corrections.{t}.{name}"] = p.detach().to("cpu", torch.float32).contiguous()
    for s in estimator.sources:
        out[f"default_vectors.{s}"] = estimator.default_vectors(s).detach().to("cpu", torch.float32).contiguous()
    return out


def save_estimator(estimator: Estimator, out_dir: str | Path, *, metrics: Mapping | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write estimator.safetensors and config.json into out_dir (created if needed);
    each file is replaced atomically. Returns the config path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    weights_sha256, _ = save_tensors(weights, estimator_tensors(estimator), {"format": "pt"})
    meta = dict(estimator.meta)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": {
            "id": meta.get("id"), "family": estimator.family.name, "model_type": meta.get("model_type"),
            "moe_layers": meta.get("moe_layers"), "num_experts": estimator.num_experts,
            "top_k": estimator.top_k, "hidden_size": estimator.hidden_size,
            "fingerprint": meta.get("fingerprint"),
        },
        "lookahead": estimator.lookahead,
        "pairs": [list(p) for p in estimator.pairs],
        "predictor": {str(t): k for t, k in estimator.kinds.items()},
        "hybrid": None if estimator.hybrid is None else {str(t): k for t, k in estimator.hybrid.items()},
        "estimator": {"width": estimator.width, "depth": estimator.depth, "activation": estimator.activation,
                      "add_shared": estimator.add_shared, "routing_features": estimator.routing_features,
                      "normed_features": estimator.normed_features, "learned": bool(len(estimator.corrections))},
        "parameters": meta.get("parameters") or estimator.parameter_counts(),
        "metrics": dict(metrics or {}),
        "weights_sha256": weights_sha256,
    }
    config.update(dict(extra or {}))
    path = out / CONFIG_FILE
    write_text(path, json.dumps(config, indent=2) + "\n")
    return path


def read_config(path: str | Path) -> dict:
    """config.json of an estimator checkpoint, format-checked (SpecmoeError / CorruptFileError)."""
    d = Path(path)
    cfg_path = d / CONFIG_FILE
    if not d.is_dir():
        raise SpecmoeError(f"estimator checkpoint {d} does not exist")
    if not cfg_path.is_file():
        raise SpecmoeError(f"{d} is not an estimator checkpoint ({CONFIG_FILE} is missing)")
    cfg = read_format_json(cfg_path, FORMAT_NAME, FORMAT_VERSION, "estimator config", "")
    for key in ("model", "lookahead", "pairs", "predictor", "estimator"):
        if key not in cfg:
            raise CorruptFileError(f"{cfg_path} is damaged: field {key!r} is missing")
    return cfg


def _check_model(cfg: Mapping, model, family, spec, where: str) -> None:
    m = cfg["model"]
    mine = {"family": spec.family, "num_experts": spec.num_experts, "top_k": spec.top_k,
            "hidden_size": spec.hidden_size, "moe_layers": list(spec.moe_layers)}
    for key, value in mine.items():
        theirs = m.get(key)
        if theirs is not None and theirs != value:
            raise MismatchError(f"{where} was made for another model ({key} {theirs!r}; this model has {value!r})")
    layers = {l for p in cfg["pairs"] for l in p}
    if not layers <= set(spec.moe_layers):
        raise MismatchError(f"{where} predicts layers {sorted(layers - set(spec.moe_layers))} "
                            "that are not MoE layers of this model")
    fp = m.get("fingerprint")
    if fp is not None:
        mine_fp = router_fingerprint(model, family)
        if fp != mine_fp:
            raise MismatchError(f"{where} was made for another model (router fingerprint {fp[:12]}... "
                                f"vs this model's {mine_fp[:12]}...)")


def check_weights(path: str | Path, cfg: Mapping | None = None) -> Path:
    """The checkpoint's weights file, checked against the sha256 in its config (CorruptFileError)."""
    d = Path(path)
    cfg = read_config(d) if cfg is None else cfg
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise CorruptFileError(f"{weights} is missing")
    if cfg.get("weights_sha256") and sha256_file(weights) != cfg["weights_sha256"]:
        raise CorruptFileError(f"{weights} does not match its sha256 in {CONFIG_FILE} (file is damaged)")
    return weights


def load_routing_model(model_id: str | Path, dtype: str = "auto") -> torch.nn.Module:
    """The model `model_id` names, on the CPU, with what estimators read of it (norms, routers,
    shared experts) and without its routed experts (specmoe.skeleton): a model of any size
    loads in the memory of its non-expert weights. dtype "auto" keeps the checkpoint's."""
    from specmoe.models import resolve_model_id
    from specmoe.skeleton import load_skeleton

    return load_skeleton(resolve_model_id(model_id), device="cpu", dtype=dtype, experts="none").model


def _model_arg(model, cfg: Mapping) -> torch.nn.Module:
    if model is None:
        model = cfg["model"].get("id")
        if not model:
            raise SpecmoeError("the estimator's config.json names no model; pass the model (or its id)")
    if isinstance(model, (str, Path)):
        return load_routing_model(model)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise SpecmoeError(
            f"load_estimator needs the model the estimator predicts for: a loaded transformers model "
            f"(its routed experts may stay unloaded), or its hub id or directory; got {type(model).__name__}")
    return model


def load_estimator(path: str | Path, model=None, device: torch.device | str | None = None) -> Estimator:
    """The Estimator saved in `path`, bound to `model`: a loaded transformers model, or its hub
    id or directory (default: the id the checkpoint records), loaded without its routed experts. The estimator holds fp32 copies of the norms and routers it needs (and
    of the shared experts with add_shared); the model itself is never moved or changed.
    Placed on `device` (default: the device of the model's first target router)."""
    from specmoe.families import detect_family

    d = Path(path)
    cfg = read_config(d)
    where = f"the estimator in {d}"
    model = _model_arg(model, cfg)
    family = detect_family(model)
    spec = family.spec(model)
    _check_model(cfg, model, family, spec, where)

    weights = check_weights(d, cfg)
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any parse failure means a damaged file
        raise CorruptFileError(f"{weights} cannot be read ({err})") from None

    try:
        pairs = [(int(s), int(t)) for s, t in cfg["pairs"]]
        est_cfg = cfg["estimator"]
        kinds = {int(t): str(k) for t, k in cfg["predictor"].items()}
        hybrid = {int(t): str(k) for t, k in cfg["hybrid"].items()} if cfg.get("hybrid") else None
        learned = bool(est_cfg.get("learned", True))
        width, depth = int(est_cfg["width"]), int(est_cfg.get("depth", 1))
        activation, add_shared = str(est_cfg.get("activation", "silu")), bool(est_cfg.get("add_shared", False))
        # absent in checkpoints written before these options existed: the net reads q_l only
        routing_features = bool(est_cfg.get("routing_features", False))
        normed_features = bool(est_cfg.get("normed_features", False))
        lookahead = int(cfg["lookahead"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptFileError(f"{d / CONFIG_FILE} is damaged ({type(err).__name__}: {err})") from None

    default_vectors = {}
    for s, _ in pairs:
        key = f"default_vectors.{s}"
        if key not in tensors:
            raise CorruptFileError(f"{weights} lacks {key}")
        default_vectors[s] = tensors[key]
    parts = collect_parts(model, family, pairs, add_shared)
    meta = {k: cfg["model"].get(k) for k in ("id", "model_type", "moe_layers", "fingerprint")}
    meta["parameters"] = cfg.get("parameters")
    est = Estimator(family, pairs=pairs, default_vectors=default_vectors, parts=parts,
                    num_experts=spec.num_experts, top_k=spec.top_k, hidden_size=spec.hidden_size,
                    lookahead=lookahead, width=width, depth=depth, activation=activation,
                    add_shared=add_shared, routing_features=routing_features, normed_features=normed_features,
                    learned=learned, meta=meta)
    if learned:
        for _, t in pairs:
            net: CorrectionNet = est.corrections[str(t)]
            state = {}
            for name, p in net.state_dict().items():
                key = f"corrections.{t}.{name}"
                if key not in tensors:
                    raise CorruptFileError(f"{weights} lacks {key}")
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise MismatchError(f"{where}: {key} has shape {tuple(tensors[key].shape)}, "
                                        f"expected {tuple(p.shape)} for this model, width {width} and "
                                        f"routing_features={routing_features}, normed_features={normed_features}")
                state[name] = tensors[key]
            net.load_state_dict(state)
    est.set_kinds(kinds)
    if hybrid is not None:
        est.hybrid = est._checked_kinds(hybrid, "hybrid")
    if device is None:
        device = family.router_weight(family.router(model, pairs[0][1])).device
    return est.to(device).eval()
