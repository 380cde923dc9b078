"""An MoE model without its routed experts: everything else loaded, experts left to the caller.

    skel = load_skeleton("Qwen/Qwen3-30B-A3B", device="cuda", dtype="auto")
    skel.model        # *ForCausalLM, eval mode; routed experts' fused parameters on meta
    skel.reader       # CheckpointReader: stream the experts from it into any store

The model is built on the meta device from its config, so no memory is spent on weights
that are then overwritten; non-expert tensors are read from the checkpoint one at a time
and put straight on `device`. Host memory peaks at about the non-expert bytes plus the
largest single tensor (the experts' bytes are never touched with experts="none").
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint_reader import CheckpointReader, parse_dtype
from .errors import SpecmoeError

__all__ = ["Skeleton", "load_skeleton"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass
class Skeleton:
    model: nn.Module
    tokenizer: object | None     # None when the checkpoint directory has no tokenizer
    family: object               # specmoe.families.Family
    spec: object                 # specmoe.families.MoESpec
    reader: CheckpointReader
    model_id: str
    dtype: torch.dtype           # of the loaded weights (a few stay float32 where transformers keeps them so)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def load_skeleton(model_id: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto",
                  revision: str | None = None, experts: str = "none") -> Skeleton:
    """Build the model and load every non-expert weight to `device` in `dtype`.

    dtype: "auto" (or None) keeps the checkpoint's dtype on every device, the CPU included
    (an MXFP4 checkpoint's is its unquantised tensors', normally bf16); or bf16 / fp16 /
    fp32 / a torch.dtype.
    experts: "none" leaves the routed experts' fused parameters on the meta device (shape
    and dtype only; calling them fails), for a runtime that keeps experts elsewhere;
    "modules" loads them into the stock experts modules (MXFP4 dequantised), giving the
    whole model."""
    if experts not in ("none", "modules"):
        raise SpecmoeError(f"experts={experts!r}: use 'none' or 'modules'")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpecmoeError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecmoeError(f"device {device} needs CUDA, but no GPU is visible")
    reader = CheckpointReader(model_id, revision)
    dtype = parse_dtype(dtype, reader.dtype)
    model = _meta_model(reader, dtype)
    family, spec = reader.family, reader.spec

    expert_names = {f"{family.module_paths(l)['experts']}.{n}" for l in spec.moe_layers for n in family.expert_params}
    fp32 = _fp32_patterns(model, dtype)
    targets = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
    loaded = set()
    for name in reader.non_expert_names():
        if name not in targets or name in expert_names:
            continue  # tensors the model class does not have (its loader ignores them too)
        empty = targets[name]
        tensor = reader.non_expert(name)
        if tuple(tensor.shape) != tuple(empty.shape):
            raise SpecmoeError(f"tensor {reader.checkpoint_key(name)} in {reader.file_of(name)} has shape "
                               f"{list(tensor.shape)}, but the model built from its config expects {list(empty.shape)}")
        _put(model, name, tensor.to(device=device, dtype=_target_dtype(name, empty, fp32)))
        loaded.add(name)

    if _ties_embeddings(model):
        output = model.get_output_embeddings()
        output.weight = model.get_input_embeddings().weight
        loaded.update(n for n, p in model.named_parameters(remove_duplicate=False) if p is output.weight)
    _rebuild_computed_buffers(model, device)

    if experts == "modules":
        for layer in spec.moe_layers:
            _load_experts(reader, family.experts(model, layer), layer, device, fp32, family)
        loaded |= expert_names
    persistent = set(model.state_dict().keys())
    missing = sorted(n for n in targets if n in persistent and n not in loaded and n not in expert_names)
    if missing:
        raise SpecmoeError(f"tensor {missing[0]} is missing from {reader.file_of(missing[0])}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.eval()
    return Skeleton(model=model, tokenizer=_tokenizer(reader.path), family=family, spec=spec, reader=reader,
                    model_id=str(model_id), dtype=dtype)


def _meta_model(reader: CheckpointReader, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(reader.config)
    # MXFP4 experts are dequantised here; the stock model must not expect packed ones.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        from transformers import GenerationConfig

        if (reader.path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(str(reader.path))
    except (OSError, ValueError):
        pass  # generation defaults are a convenience, not part of the weights
    return model.eval()


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> re.Pattern | None:
    # As transformers' loader: `_keep_in_fp32_modules_strict` stay float32 in bf16 and fp16,
    # `_keep_in_fp32_modules` only in fp16; the entries are regular expressions searched in names.
    patterns = []
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        patterns += list(getattr(model, "_keep_in_fp32_modules", None) or ())
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def _target_dtype(name: str, empty: torch.Tensor, fp32: re.Pattern | None) -> torch.dtype:
    if not empty.is_floating_point():
        return empty.dtype
    if fp32 is not None and fp32.search(name):
        return torch.float32
    return empty.dtype  # the model's own choice: dtype, or float32 where a module asks for it explicitly


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _ties_embeddings(model: nn.Module) -> bool:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(config, "tie_word_embeddings", False)) and model.get_output_embeddings() is not None


def _rebuild_computed_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq and the like) are computed, not stored: build
    their module afresh on the CPU, where transformers computes them too, and move it."""
    persistent = set(model.state_dict().keys())
    for name, module in list(model.named_modules()):
        own = [b for n, b in module.named_buffers(recurse=False) if f"{name}.{n}".lstrip(".") not in persistent]
        if not any(b.is_meta for b in own):
            continue
        config = getattr(module, "config", None)
        if config is None or "Rotary" not in type(module).__name__:
            raise SpecmoeError(f"cannot rebuild the computed buffers of {name} ({type(module).__name__}) "
                               f"without loading the whole model")
        with torch.device("cpu"):
            fresh = type(module)(config)
        _replace_module(model, name, fresh.to(device))


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def _load_experts(reader: CheckpointReader, experts: nn.Module, layer: int, device: torch.device,
                  fp32: re.Pattern | None, family) -> None:
    prefix = family.module_paths(layer)["experts"]
    stacks = {}
    for name in family.expert_params:
        empty = getattr(experts, name)
        stacks[name] = torch.empty(empty.shape, dtype=_target_dtype(f"{prefix}.{name}", empty, fp32), device=device)
    for e in range(reader.spec.num_experts):
        reader.expert(layer, e, out={name: stack[e] for name, stack in stacks.items()})
    for name, stack in stacks.items():
        experts._parameters[name] = nn.Parameter(stack, requires_grad=False)


def _tokenizer(path: Path):
    if not any((path / f).exists() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        text = str(err).strip().splitlines()
        raise SpecmoeError(f"cannot load the tokenizer in {path}: {text[0] if text else type(err).__name__}") from None
