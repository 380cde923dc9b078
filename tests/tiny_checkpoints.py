"""Tiny checkpoints of every family in each on-disk layout it can be published in.

The layouts are written here from the stock in-memory tensors with this file's own
knowledge of the published key names (not specmoe.families'), so the reader is checked
against an independent description:

    published   per-expert keys as the families publish them (GPT-OSS: MXFP4, quantised here)
    fused       the in-memory state dict as is: one stacked tensor per layer and expert tensor
    saved       whatever the installed transformers' save_pretrained writes
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from specmoe.families import detect_family

# family -> (MoE block on disk, gate / up / down names, in-memory -> on-disk renames of other keys)
_QWEN = ("mlp", "gate_proj", "up_proj", "down_proj", {})
PUBLISHED_NAMES = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2", {".mlp.gate.": ".block_sparse_moe.gate."}),
    "phimoe": ("block_sparse_moe", "w1", "w3", "w2", {".mlp.router.": ".block_sparse_moe.gate."}),
}

_FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., in] -> (blocks uint8 [..., in/32, 16], scales uint8 [..., in/32]): nearest FP4
    value after dividing each group of 32 by the power of two that fits its max into 6."""
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=2.0 ** -120) / 6.0)).clamp(-127, 127)
    q = g / torch.exp2(exp).unsqueeze(-1)
    code = (q.abs().unsqueeze(-1) - _FP4_MAGNITUDES).abs().argmin(-1) | ((q < 0).long() << 3)
    code = code.to(torch.uint8).reshape(*g.shape[:-1], 16, 2)
    return code[..., 0] | (code[..., 1] << 4), (exp + 127).to(torch.uint8)


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """`model.safetensors`, or `shards` files plus `model.safetensors.index.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def published_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the keys and layout its family publishes."""
    family = detect_family(model)
    spec = family.spec(model)
    state = dict(model.state_dict())
    if family.name == "gpt_oss":
        for layer in spec.moe_layers:
            prefix = f"model.layers.{layer}.mlp.experts."
            for name in ("gate_up_proj", "down_proj"):
                # In memory [E, in, out]; published [E, out, in] packed along `in`.
                blocks, scales = quantize_mxfp4(state.pop(prefix + name).transpose(1, 2))
                state[prefix + name + "_blocks"], state[prefix + name + "_scales"] = blocks, scales
        return state
    block, gate, up, down, renames = PUBLISHED_NAMES.get(family.name, _QWEN)
    out = {}
    for key, value in state.items():
        for memory, disk in renames.items():
            key = key.replace(memory, disk)
        out[key] = value
    for layer in spec.moe_layers:
        gate_up = out.pop(f"model.layers.{layer}.mlp.experts.gate_up_proj")
        down_w = out.pop(f"model.layers.{layer}.mlp.experts.down_proj")
        inter = gate_up.shape[1] // 2
        for e in range(spec.num_experts):
            prefix = f"model.layers.{layer}.{block}.experts.{e}."
            out[prefix + gate + ".weight"] = gate_up[e, :inter]
            out[prefix + up + ".weight"] = gate_up[e, inter:]
            out[prefix + down + ".weight"] = down_w[e]
    return out


def save_layout(model, directory: Path, layout: str, shards: int = 1) -> Path:
    """Write `model` as `layout` ("published", "fused" or "saved") into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "saved":
        model.save_pretrained(directory, max_shard_size="40KB" if shards > 1 else "50GB")
        return directory
    model.config.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    # As a publisher's config would: its dtype is the tensors' (transformers' "auto" reads it).
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = str(next(model.parameters()).dtype).removeprefix("torch.")
    if layout == "published" and detect_family(model).name == "gpt_oss":
        config["quantization_config"] = {"quant_method": "mxfp4",
                                         "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                    "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config))
    tensors = published_state_dict(model) if layout == "published" else dict(model.state_dict())
    return write_safetensors(directory, tensors, shards)


VARIANTS = (("published", 1), ("published", 3), ("fused", 1), ("saved", 3))


class TinyCheckpoints:
    """Lazily written checkpoints of each tiny family model, shared by the test modules."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[str, torch.nn.Module] = {}
        self._dirs: dict[tuple, Path] = {}
        self._stock: dict[str, torch.nn.Module] = {}

    def model(self, model_type: str):
        from tiny_models import tiny_model

        if model_type not in self._models:
            self._models[model_type] = tiny_model(model_type)
        return self._models[model_type]

    def dir(self, model_type: str, layout: str, shards: int = 1) -> Path:
        key = (model_type, layout, shards)
        if key not in self._dirs:
            self._dirs[key] = save_layout(self.model(model_type), self.root / f"{model_type}-{layout}-{shards}",
                                          layout, shards)
        return self._dirs[key]

    def stock(self, model_type: str):
        """The model as transformers loads it back from what its save_pretrained wrote."""
        from transformers import AutoModelForCausalLM

        if model_type not in self._stock:
            self._stock[model_type] = AutoModelForCausalLM.from_pretrained(
                self.dir(model_type, "saved", 3), dtype=torch.float32).eval()
        return self._stock[model_type]



_SHARED: dict[Path, TinyCheckpoints] = {}


def shared_checkpoints(tmp_path_factory) -> TinyCheckpoints:
    """One TinyCheckpoints per test session, whichever test module asks first."""
    root = tmp_path_factory.getbasetemp() / "tiny-checkpoints"
    if root not in _SHARED:
        root.mkdir(exist_ok=True)
        _SHARED[root] = TinyCheckpoints(root)
    return _SHARED[root]
