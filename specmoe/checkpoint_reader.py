"""Read an MoE checkpoint's tensors straight from its safetensors files, no model built.

    reader = CheckpointReader("Qwen/Qwen3-30B-A3B")        # or a local directory
    reader.expert(layer, e)                  # {name: tensor} as Family.expert_tensors gives it
    reader.expert(layer, e, out=views)       # ... written into preallocated tensors
    for name, t in reader.iter_non_expert(): # everything but the routed experts

Where the experts sit on disk (per-expert matrices, fused stacks, MXFP4 blocks) is the
family's data (`Family.checkpoint_layouts`); the reader finds which layout a checkpoint
uses from its keys, checks every expert tensor's presence and shape from the headers when
it opens, and then reads only the bytes asked for, one expert at a time.

Files are memory-mapped: a CPU tensor handed out without a dtype change is a (copy-on-write)
view of the file, as transformers' own CPU loading gives; do not rewrite a checkpoint in
place while tensors read from it are in use.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .errors import CorruptFileError, SpecmoeError, first_line
from .hub import hub_offline
from .families import MXFP4_PARTS, ROUTER_STATE, CheckpointLayout, detect_family, fingerprint_router_state
from .models import DTYPES, load_config, resolve_model_id

__all__ = ["CheckpointReader", "dequantize_mxfp4", "resolve_checkpoint_dir"]

Tensor = torch.Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# What a hub snapshot needs: config, weights and the tokenizer (its files are json or these).
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt"]

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
_FLOATS = ("BF16", "F16", "F32", "F64")

# FP4 e2m1: sign bit, two exponent bits, one mantissa bit.
_FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """MXFP4 -> dtype. blocks uint8 [..., G, 16] hold 32 FP4 values per group (low nibble
    first), scales uint8 [..., G] the group's E8M0 exponent (2^(s-127)); gives [..., G*32].

    Computed in float32, where every FP4 value times a power of two is exact, then
    rounded once to dtype."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 needs uint8 blocks [..., G, 16] and scales [..., G], got "
                         f"{blocks.dtype} {tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    lut = _FP4_VALUES.to(blocks.device)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)
    values = values.flatten(-2)                                   # [..., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32).sub_(127).unsqueeze(-1))
    return values.flatten(-2).to(dtype)


def resolve_checkpoint_dir(model_id: str | Path | None, revision: str | None = None) -> Path:
    """A local model directory: the directory itself, or a hub id's snapshot (cached, or
    downloaded unless HF_HUB_OFFLINE=1: only config, tokenizer and safetensors files)."""
    model_id = resolve_model_id(model_id)
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SpecmoeError(f"{model_id} is a file; expected a model directory or a hub id")
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise SpecmoeError(f"model path {model_id} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # the hub client raises a dozen types; the user needs one line
        if hub_offline():
            raise SpecmoeError(
                f"{model_id} is not a local directory and not in the Hugging Face cache, and "
                f"HF_HUB_OFFLINE=1 forbids downloading it; pass a directory or fill the cache first"
            ) from None
        raise SpecmoeError(f"cannot fetch {model_id} from the Hugging Face hub: {first_line(err)}") from None


class CheckpointReader:
    """The tensors of one MoE checkpoint (a directory or hub id), read lazily from its
    safetensors files (single `model.safetensors` or sharded with an index).

    Attributes: `path`, `config`, `family`, `spec` (MoESpec), `layout` (name of the
    detected expert layout: "per_expert", "fused" or "mxfp4"), `dtype` (the checkpoint's
    floating dtype: that of most of its floating-point bytes, MXFP4 blocks not counted; read
    off the tensors, not the config's `dtype` field, which normally agrees)."""

    def __init__(self, model_id_or_dir: str | Path, revision: str | None = None):
        self.path = resolve_checkpoint_dir(model_id_or_dir, revision)
        self.model_id = str(model_id_or_dir)
        self.config = load_config(str(self.path))
        self.family = detect_family(self.config)
        self.spec = self.family.spec(self.config)
        quant = getattr(self.config, "quantization_config", None) or {}
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        method = getattr(method, "value", method)
        if method not in (None, "mxfp4"):
            raise SpecmoeError(f"{self.path} is quantised with {method}; specmoe reads unquantised and MXFP4 checkpoints only")
        self._handles: dict[str, object] = {}
        self._where: dict[str, str] = {}          # checkpoint key -> file name
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # key -> (safetensors dtype, shape)
        self._open_files()
        self._layout = self._detect_layout()
        self.layout: str = self._layout.name
        self._expert_keys = self._check_expert_keys()
        self._non_expert = self._map_non_expert()  # memory name -> checkpoint key
        self.dtype: torch.dtype = self._floating_dtype()

    # ------------------------------------------------------------------ files

    def _open_files(self) -> None:
        from safetensors import safe_open

        index_path = self.path / INDEX_FILE
        weight_map: dict[str, str] | None = None
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise CorruptFileError(f"{index_path}: not a safetensors index ({first_line(err)})") from None
        elif (self.path / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            bins = list(self.path.glob("*.bin")) + list(self.path.glob("*.pt"))
            hint = " (it has only PyTorch .bin weights: re-save with safetensors)" if bins else ""
            raise SpecmoeError(f"{self.path} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}){hint}")
        for name in files:
            file = self.path / name
            if not file.exists():
                raise SpecmoeError(f"{index_path} lists {name}, which is missing from {self.path}")
            try:
                handle = safe_open(str(file), framework="pt")
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self._meta[key] = (piece.get_dtype(), tuple(piece.get_shape()))
                    self._where[key] = name
            except Exception as err:  # safetensors reports every kind of damage as one error type
                raise CorruptFileError(f"{file}: not a valid safetensors file ({first_line(err)})") from None
            self._handles[name] = handle
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise SpecmoeError(f"tensor {key} is missing from {self.path / name} (where {INDEX_FILE} puts it)")

    def _file_of(self, key: str) -> Path:
        """The file holding key, or for a missing key where it should have been."""
        if key in self._where:
            return self.path / self._where[key]
        if len(self._handles) == 1:
            return self.path / next(iter(self._handles))
        return self.path / INDEX_FILE if (self.path / INDEX_FILE).exists() else self.path

    def _missing(self, key: str) -> SpecmoeError:
        return SpecmoeError(f"tensor {key} is missing from {self._file_of(key)}")

    def _get(self, key: str) -> Tensor:
        if key not in self._where:
            raise self._missing(key)
        return self._handles[self._where[key]].get_tensor(key)

    def _get_row(self, key: str, index: int) -> Tensor:
        """Row `index` of a stacked tensor, reading only its bytes."""
        if key not in self._where:
            raise self._missing(key)
        return self._handles[self._where[key]].get_slice(key)[index]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- layout

    def _stored_keys(self, layout: CheckpointLayout, name: str, layer: int, expert: int = 0) -> tuple[str, ...]:
        keys = layout.keys(name, layer, expert)
        if name in layout.mxfp4:
            return tuple(k + part for k in keys for part in MXFP4_PARTS)
        return keys

    def _detect_layout(self) -> CheckpointLayout:
        layer = self.spec.moe_layers[0]
        layouts = self.family.checkpoint_layouts()
        for layout in layouts:
            if all(k in self._where for name in layout.tensors for k in self._stored_keys(layout, name, layer)):
                return layout
        first = self._stored_keys(layouts[0], self.family.expert_params[0], layer)[0]
        tried = ", ".join(self._stored_keys(l, self.family.expert_params[0], layer)[0] for l in layouts[1:])
        raise SpecmoeError(f"tensor {first} (or {tried}) is missing from {self._file_of(first)}: "
                           f"no routed experts of MoE layer {layer} found")

    def _stored_shapes(self, name: str) -> dict[str, tuple[int, ...]]:
        """The shape each stored key of tensor `name` must have, by suffix ('' for plain keys)."""
        spec, layout = self.spec, self._layout
        shape = self.family.expert_shapes(spec)[name]
        # Matrices are stored [out, in] except when fused in memory order.
        out_in = shape[::-1] if (len(shape) == 2 and self.family.weights_in_out) else shape
        if layout.per_expert:
            parts = len(layout.tensors[name])
            return {"": (out_in[0] // parts, *out_in[1:])}
        if name in layout.mxfp4:
            groups = out_in[1] // 32
            return {"_blocks": (spec.num_experts, out_in[0], groups, 16), "_scales": (spec.num_experts, out_in[0], groups)}
        return {"": (spec.num_experts, *shape)}

    def _check_expert_keys(self) -> frozenset[str]:
        """Every routed-expert key, each checked for presence and shape from the headers."""
        keys, spec, layout = set(), self.spec, self._layout
        for name in layout.tensors:
            expected = self._stored_shapes(name)
            for layer in spec.moe_layers:
                for e in range(spec.num_experts if layout.per_expert else 1):
                    for base in layout.keys(name, layer, e):
                        for suffix, shape in expected.items():
                            key = base + suffix
                            if key not in self._meta:
                                raise self._missing(key)
                            dtype, found = self._meta[key]
                            if found != shape:
                                raise SpecmoeError(
                                    f"tensor {key} in {self._file_of(key)} has shape {list(found)}, expected "
                                    f"{list(shape)} (hidden {spec.hidden_size}, expert intermediate "
                                    f"{spec.expert_intermediate_size}, {spec.num_experts} experts)")
                            if suffix and dtype != "U8":
                                raise SpecmoeError(f"tensor {key} in {self._file_of(key)} is {dtype}, expected U8 (MXFP4)")
                            keys.add(key)
        return frozenset(keys)

    def _map_non_expert(self) -> dict[str, str]:
        # Layers past num_hidden_layers are extra modules some checkpoints carry (DeepSeek-V3
        # and GLM-4.5 multi-token-prediction layers) that the *ForCausalLM does not have.
        layer_key = re.compile(rf"^model\.{re.escape(self.family.layers_attr)}\.(\d+)\.")
        mapped = {}
        for key in self._where:
            if key in self._expert_keys:
                continue
            m = layer_key.match(key)
            if m and int(m.group(1)) >= self.spec.num_layers:
                continue
            mapped[self.family.memory_name(key)] = key
        return mapped

    def _floating_dtype(self) -> torch.dtype:
        weight = Counter()
        for key, (dtype, shape) in self._meta.items():
            if dtype in _FLOATS:
                weight[dtype] += math.prod(shape)
        if not weight:
            raise SpecmoeError(f"{self.path} holds no floating-point tensors")
        return _ST_DTYPES[weight.most_common(1)[0][0]]

    # ---------------------------------------------------------------- experts

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each tensor of one expert, in the in-memory layout (Family.expert_tensors)."""
        return self.family.expert_shapes(self.spec)

    def expert_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one expert's tensors in dtype (default the checkpoint's)."""
        item = torch.empty((), dtype=dtype or self.dtype).element_size()
        return sum(math.prod(s) for s in self.expert_shapes().values()) * item

    def expert(self, layer: int, expert: int, dtype: torch.dtype | None = None,
               out: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Expert `expert` of decoder layer `layer` as {name: tensor} in the in-memory layout,
        in dtype (default the checkpoint's; MXFP4 is dequantised to it). With `out` (tensors
        of the right shapes, e.g. views into a pinned block) it is written there and `out`
        is returned; its dtype then wins."""
        spec, layout = self.spec, self._layout
        if layer not in spec.moe_layers:
            raise SpecmoeError(f"layer {layer} has no routed experts (MoE layers: {list(spec.moe_layers)})")
        if not 0 <= expert < spec.num_experts:
            raise SpecmoeError(f"expert {expert} is out of range: layer {layer} has {spec.num_experts} experts")
        shapes = self.expert_shapes()
        if out is not None:
            for name, shape in shapes.items():
                if name not in out or tuple(out[name].shape) != shape:
                    got = tuple(out[name].shape) if name in out else "nothing"
                    raise SpecmoeError(f"out[{name!r}] must have shape {shape}, got {got}")
        dtype = dtype or self.dtype
        result = {} if out is None else out
        for name, shape in shapes.items():
            keys = layout.keys(name, layer, expert)
            if name in layout.mxfp4:
                blocks, scales = (self._get_row(keys[0] + part, expert) for part in MXFP4_PARTS)
                parts = [dequantize_mxfp4(blocks, scales, torch.float32)]   # [out, in]
            elif layout.per_expert:
                parts = [self._get(k) for k in keys]                          # [out_k, in] each
            else:
                part = self._get_row(keys[0], expert)                        # in-memory order already
                if out is None:
                    result[name] = part if part.dtype == dtype else part.to(dtype)
                else:
                    out[name].copy_(part)
                continue
            target = out[name] if out is not None else torch.empty(shape, dtype=dtype)
            # Stored [out, in]; a family that keeps [in, out] sees them through a transpose.
            rows = target.mT if (target.dim() == 2 and self.family.weights_in_out) else target
            at = 0
            for part in parts:
                rows[at:at + part.shape[0]].copy_(part)
                at += part.shape[0]
            result[name] = target
        return result

    # ------------------------------------------------------------ non-experts

    def non_expert_names(self) -> list[str]:
        """In-memory names of every tensor `iter_non_expert` yields, in its order."""
        return list(self._non_expert)

    def checkpoint_key(self, name: str) -> str:
        """The checkpoint key (as stored) of a non-expert in-memory name."""
        return self._non_expert[name]

    def file_of(self, name: str) -> Path:
        """The file holding a non-expert in-memory name (for error messages)."""
        return self._file_of(self._non_expert.get(name, name))

    def non_expert(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Tensor:
        """One non-expert tensor by in-memory name; floating tensors cast to dtype if given."""
        if name not in self._non_expert:
            raise SpecmoeError(f"tensor {name} is missing from {self._file_of(name)}")
        t = self._get(self._non_expert[name])
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def iter_non_expert(self, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> Iterator[tuple[str, Tensor]]:
        """(in-memory name as in the *ForCausalLM state dict, tensor) for everything but the
        routed experts, one tensor at a time: routers, norms, attention, embeddings, LM head,
        shared experts, dense MLPs, correction biases. Floating tensors are cast to dtype
        if given; each keeps its stored dtype otherwise."""
        for name in self._non_expert:
            yield name, self.non_expert(name, dtype, device)

    def non_expert_state_dict(self, dtype: torch.dtype | None = None,
                              device: str | torch.device = "cpu") -> dict[str, Tensor]:
        return dict(self.iter_non_expert(dtype, device))

    # ---------------------------------------------------------------- routing

    def router_fingerprint(self) -> str:
        """`specmoe.families.router_fingerprint` of the model these files load into."""
        def state():
            for layer in self.spec.moe_layers:
                router = self.family.module_paths(layer)["router"]
                for name, attr in ROUTER_STATE.items():
                    key = f"{router}.{attr}"
                    t = self.non_expert(key) if key in self._non_expert else None
                    if name == "weight":
                        if t is None:
                            raise self._missing(key)
                        if tuple(t.shape) != (self.spec.num_experts, self.spec.hidden_size):
                            raise SpecmoeError(f"tensor {self._non_expert[key]} in {self.file_of(key)} has shape "
                                               f"{list(t.shape)}, expected {[self.spec.num_experts, self.spec.hidden_size]}")
                    yield layer, name, t
        return fingerprint_router_state(self.spec, state())

    def __repr__(self) -> str:
        return (f"CheckpointReader({str(self.path)!r}, family={self.family.name}, layout={self.layout}, "
                f"dtype={self.dtype}, files={len(self._handles)})")


def parse_dtype(dtype: str | torch.dtype | None, checkpoint: torch.dtype) -> torch.dtype:
    """'auto' or None (the checkpoint's own), a name from specmoe.models.DTYPES, or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return checkpoint
    if dtype not in DTYPES:
        raise SpecmoeError(f"unknown dtype {dtype!r}; use auto, bf16, fp16 or fp32")
    return DTYPES[dtype]
