"""Load a Hugging Face MoE model the way users do, with errors a user can act on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .errors import SpecmoeError, first_line
from .paths import DEMO_MODEL_DIR, REPO_ROOT

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    family: object          # specmoe.families.Family
    spec: object            # specmoe.families.MoESpec
    model_id: str
    revision: str | None

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


def resolve_dtype(name: str, device: str) -> torch.dtype | str:
    if name == "auto":
        # CPUs run bf16 matmuls slowly and less exactly; GPUs want the checkpoint's own dtype
        return torch.float32 if device == "cpu" else "auto"
    if name not in DTYPES:
        raise SpecmoeError(f"unknown dtype {name!r}; use auto, bf16, fp16 or fp32")
    return DTYPES[name]


def resolve_model_id(model_id: str | Path | None) -> str:
    """The bundled demo model by default; a path relative to this repository (as traces
    and checkpoints record it) also works from another working directory."""
    model_id = str(model_id or DEMO_MODEL_DIR)
    path = Path(model_id).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path / "config.json").exists():
        return str(REPO_ROOT / path)
    return model_id


def load_config(model_id: str | Path | None = None, revision: str | None = None):
    from transformers import AutoConfig

    model_id = resolve_model_id(model_id)
    path = Path(model_id).expanduser()
    if model_id.startswith((".", "/", "~")) and not path.exists():
        raise SpecmoeError(f"model path {model_id} does not exist")
    if path.is_dir() and not (path / "config.json").exists():
        raise SpecmoeError(f"{model_id} is a directory without config.json, not a Hugging Face model")
    if not path.exists():  # a hub id: fail in seconds where the hub cannot be used
        from .hub import require_hub

        require_hub("model", model_id, revision=revision)
    try:
        return AutoConfig.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError, KeyError) as err:
        raise SpecmoeError(f"cannot load model config from {model_id}: {first_line(err)}") from None


def load_moe_model(model_id: str | Path | None = None, *, dtype: str = "auto", device: str = "cpu",
                   revision: str | None = None, experts_implementation: str | None = None) -> LoadedModel:
    """Load model + tokenizer; refuse dense or unsupported models before reading any weights.

    device: "cpu", "cuda", "cuda:N", or "auto" to shard over every visible GPU with device_map.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .families import detect_family

    model_id = resolve_model_id(model_id)
    config = load_config(model_id, revision)
    family = detect_family(config)
    if device != "cpu" and not torch.cuda.is_available():
        raise SpecmoeError(f"--device {device} needs CUDA, but no GPU is visible")
    kwargs = {"revision": revision, "dtype": resolve_dtype(dtype, device)}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise SpecmoeError(f"cannot load model {model_id}: {first_line(err)}") from None
    if device not in ("cpu", "auto"):
        model = model.to(device)
    if experts_implementation and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(experts_implementation)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, spec=family.spec(model.config),
                       model_id=model_id, revision=revision)
