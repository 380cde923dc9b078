"""How many experts fit the GPU budget the user gives (`--gpu-expert-budget`)."""

from __future__ import annotations

import re

from specmoe.errors import SpecmoeError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(text: str | int, all_expert_bytes: int) -> int:
    """Bytes from '0', '123456789', '8GiB', '1.5 GB' or '25%' (of all expert bytes)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(%|[kmgt]i?b|b)?", s)
    if not m:
        raise SpecmoeError(f"cannot read GPU expert budget {text!r}: give bytes (8GiB, 512MB, 1e9 as 1000000000) "
                           "or a share of all expert bytes (25%)")
    value, unit = float(m.group(1)), m.group(2) or ""
    if unit == "%":
        if value > 100:
            raise SpecmoeError(f"GPU expert budget {text!r} is more than all expert bytes")
        return int(all_expert_bytes * value / 100)
    return int(value * _UNITS[unit])


def minimum_slots(top_k: int, lookahead: int, predicting: bool) -> int:
    """Two layers in flight: the layer being computed and the layers whose experts are
    being copied ahead (h of them with lookahead h)."""
    return top_k * (1 + (lookahead if predicting else 1))


def slots_for_budget(text: str | int, block_bytes: int, total_experts: int, top_k: int, lookahead: int,
                     predicting: bool, free_bytes: int | None) -> int:
    least = minimum_slots(top_k, lookahead, predicting)
    budget = parse_budget(text, block_bytes * total_experts)
    slots = least if budget == 0 else budget // block_bytes
    if slots < least:
        raise SpecmoeError(f"a GPU expert budget of {budget / 2**20:.1f} MiB holds {slots} experts; the minimum is "
                           f"{least} ({least * block_bytes / 2**20:.1f} MiB: two layers of {top_k} experts in flight; "
                           "0 asks for it)")
    slots = min(slots, total_experts + 0)  # more slots than experts would stay empty
    need = (slots + 1) * block_bytes
    if free_bytes is not None and need > free_bytes:
        raise SpecmoeError(f"a GPU expert budget of {need / 2**30:.2f} GiB is more than the "
                           f"{free_bytes / 2**30:.2f} GiB of GPU memory free")
    return slots
