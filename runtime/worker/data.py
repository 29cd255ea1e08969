"""Training tokens: a learnable synthetic stream, or windows of a token file.

Every micro-batch is a pure function of (seed, data-parallel rank, step, micro-batch index), so
tensor-parallel and context-parallel peers draw the same sample without communicating, each
data-parallel replica draws its own, and each virtual pipeline chunk can replay the stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from megatron.core.utils import get_batch_on_this_cp_rank

from megacpp.planner.errors import LaunchError


class SyntheticChain:
    """Samples that walk one fixed random cycle through the vocabulary.

    Token t+1 is always succ(token t) for a random cyclic permutation succ, and each sample starts
    at a random token. The first token of a sample is unpredictable (loss ln V); every later one
    is determined by its predecessor, so the loss falls visibly within tens of steps as the
    embedding and output layer learn succ.
    """

    def __init__(self, vocab: int, seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(vocab, generator=gen)
        position = torch.empty_like(order)
        position[order] = torch.arange(vocab)
        self.vocab = vocab
        self.order, self.position = order.to(device), position.to(device)

    def sample(self, gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
        """[batch, length] token ids, each row a walk along the cycle from a random start."""
        start = torch.randint(self.vocab, (batch,), generator=gen).to(self.order.device)
        steps = torch.arange(length, device=self.order.device)
        return self.order[(self.position[start, None] + steps) % self.vocab]


class TokenFile:
    """Random contiguous windows of a token file: `.npy` (any integer dtype) or `.bin` (raw uint16,
    the nanoGPT convention)."""

    def __init__(self, path: str | Path, vocab: int, device: torch.device) -> None:
        p = Path(path)
        if p.suffix not in (".npy", ".bin"):
            raise LaunchError(f"--tokens {path}: expected a .npy or .bin file")
        try:
            self.tokens = np.load(p, mmap_mode="r") if p.suffix == ".npy" else np.memmap(p, dtype=np.uint16, mode="r")
        except (OSError, ValueError) as exc:
            raise LaunchError(f"--tokens {path}: cannot read ({exc}); pass a .npy array of token ids or a raw uint16 .bin") from None
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise LaunchError(f"--tokens {path}: expected a 1-D integer array, got {self.tokens.dtype} {self.tokens.shape}")
        top = int(self.tokens.max()) if len(self.tokens) else 0
        if top >= vocab:
            raise LaunchError(f"--tokens {path}: token id {top} is outside model.vocab_size={vocab}")
        self.device = device

    def sample(self, gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
        """[batch, length] token ids from random offsets of the file."""
        if len(self.tokens) < length:
            raise LaunchError(f"--tokens: the file holds {len(self.tokens)} tokens, fewer than one sample of {length}")
        starts = torch.randint(len(self.tokens) - length + 1, (batch,), generator=gen).tolist()
        rows = np.stack([np.asarray(self.tokens[s : s + length], dtype=np.int64) for s in starts])
        return torch.from_numpy(rows).to(self.device)


def _generator(seed: int, dp_rank: int, step: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, dp_rank, step, index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def microbatches(
    source: SyntheticChain | TokenFile, *, seed: int, dp_rank: int, step: int, count: int,
    micro_batch_size: int, seq_length: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """The `count` micro-batches of one step: tokens, labels (next tokens), loss mask, positions,
    sliced to this context-parallel rank the way Megatron-LM's get_batch does."""
    for index in range(count):
        window = source.sample(_generator(seed, dp_rank, step, index), micro_batch_size, seq_length + 1)
        tokens, labels = window[:, :-1].contiguous(), window[:, 1:].contiguous()
        batch = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": torch.ones_like(tokens, dtype=torch.float),
            "position_ids": torch.arange(seq_length, device=tokens.device).expand_as(tokens).contiguous(),
        }
        yield get_batch_on_this_cp_rank(batch)  # a no-op when cp == 1
