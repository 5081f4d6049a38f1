"""Length-grouped batches draw their order from a generator of their own, so a resumed run sees the same batches.

transformers builds the training `LengthGroupedSampler` (train_sampling_strategy="group_by_length", llmtune's
default for padded batches) without a generator, so each epoch's order comes from the global torch RNG at the
moment the epoch starts. A resumed run reaches that moment with a different RNG state (no evaluation before
training, no earlier epochs drawing from it), gets another order, and then skips the wrong batches: it trains on
different data than the run it continues. (The plain random strategy does not have this problem: accelerate swaps
in a sampler seeded by the run's seed and the epoch.) This callback gives the sampler that same kind of generator
- seeded by training.seed and the epoch - before each epoch's order is drawn.
Canary: tests/test_patches.py::test_transformers_still_builds_length_grouped_batches_without_a_generator.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from llmtune.patches import applied


def train_sampler(loader) -> object | None:
    """The sampler inside a (possibly accelerate-wrapped, possibly sharded) training DataLoader."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for holder in (batch_sampler, getattr(batch_sampler, "batch_sampler", None), loader):
        sampler = getattr(holder, "sampler", None)
        if isinstance(sampler, LengthGroupedSampler):
            return sampler
    return None


class SeededLengthGroupedOrder(TrainerCallback):
    def __init__(self, seed: int):
        self.seed = seed

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = train_sampler(train_dataloader) if train_dataloader is not None else None
        if sampler is not None:
            applied(__name__)
            sampler.generator = torch.Generator().manual_seed(self.seed + int(state.epoch or 0))
        return control
