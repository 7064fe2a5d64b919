"""Byte-level text data.

The default corpus is the English reference text CPython ships in ``pydoc_data.topics``
(about 0.5-1 MB, no download). Any UTF-8 text file can be used instead.

Batches are a pure function of (seed, step): a resumed run reads exactly the batches the
uninterrupted run would have read, and the "data position" is just the step counter.
"""
from __future__ import annotations

from typing import Optional

import torch

VOCAB_SIZE = 256


def load_corpus(path: Optional[str] = None) -> torch.Tensor:
    """The corpus as a 1-D uint8 tensor of UTF-8 bytes.

    path: a text file, or None for ``pydoc_data.topics`` (topics joined in sorted order).
    """
    if path is None:
        try:
            from pydoc_data.topics import topics
        except ImportError as exc:  # some distro Pythons strip pydoc_data
            raise RuntimeError("the default corpus needs the standard-library module "
                               "pydoc_data.topics; pass --data PATH to a text file") from exc
        text = "\n\n".join(topics[k] for k in sorted(topics))
        raw = text.encode("utf-8")
    else:
        with open(path, "rb") as f:
            raw = f.read()
    if len(raw) < 2:
        raise ValueError(f"corpus {path or 'pydoc_data.topics'} has {len(raw)} bytes; need at least 2")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class ByteBatches:
    """Random windows of a byte corpus.

    corpus_U8:    [U] uint8 corpus.
    seq_len:      S, positions per sequence (each window has S + 1 bytes: inputs + targets).
    global_batch: sequences per step over all data-parallel ranks.
    seed:         batch order seed.
    """

    def __init__(self, corpus_U8: torch.Tensor, seq_len: int, global_batch: int, seed: int):
        if corpus_U8.numel() < seq_len + 1:
            raise ValueError(f"corpus has {corpus_U8.numel()} bytes, fewer than seq_len + 1 = "
                             f"{seq_len + 1}")
        self.corpus_U8 = corpus_U8
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed

    def global_batch_at(self, step: int) -> torch.Tensor:
        """[global_batch, S + 1] int64 windows for ``step`` (0-based)."""
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(step))
        starts_B = torch.randint(0, self.corpus_U8.numel() - self.seq_len, (self.global_batch,),
                                 generator=g)
        offs_BS = starts_B[:, None] + torch.arange(self.seq_len + 1)
        return self.corpus_U8[offs_BS].long()

    def local_batch_at(self, step: int, rank: int, world: int) -> torch.Tensor:
        """This data-parallel rank's contiguous share of ``global_batch_at(step)``."""
        if self.global_batch % world:
            raise ValueError(f"train.batch_size ({self.global_batch}) must be divisible by "
                             f"the number of ranks ({world})")
        b = self.global_batch // world
        return self.global_batch_at(step)[rank * b:(rank + 1) * b]
