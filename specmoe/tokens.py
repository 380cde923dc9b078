"""Turn a text dataset into fixed-length rows of token ids, deterministically.

Texts are taken in dataset order, each followed by the end-of-text token, and
cut into rows of `seq_len`; the tail that does not fill a row is dropped. The
same dataset and tokenizer always give the same rows, which is what lets an
interrupted trace resume exactly where it stopped.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .errors import SpecmoeError


def iter_rows(dataset, tokenizer, text_field: str, seq_len: int, max_tokens: int | None = None,
              chunk: int = 256) -> Iterator[torch.Tensor]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SpecmoeError("the tokenizer has no end-of-text token to separate documents")
    max_rows = None if max_tokens is None else max_tokens // seq_len
    buffer: list[int] = []
    emitted = 0
    for start in range(0, len(dataset), chunk):
        texts = dataset[start:start + chunk][text_field]
        for ids in tokenizer([t or "" for t in texts], add_special_tokens=False, verbose=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            del buffer[:seq_len]
            emitted += 1
            if max_rows is not None and emitted >= max_rows:
                return


def pack_rows(dataset, tokenizer, text_field: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    rows = list(iter_rows(dataset, tokenizer, text_field, seq_len, max_tokens))
    if not rows:
        raise SpecmoeError(f"the dataset holds fewer than seq_len={seq_len} tokens")
    return torch.stack(rows)
