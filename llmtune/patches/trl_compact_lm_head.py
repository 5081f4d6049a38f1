"""trl's fused LM head projecting only the labelled positions on a CPU, as it already does on Triton devices.

trl's preference trainers (DPO here) give the model a fused output head (`trl.trainer.utils.add_fused_lm_head`): it
projects the hidden states through the head in tiles and returns each position's log-probability of its label. On
Triton devices it projects only the positions whose label is not -100. Everywhere else it projects every position,
prompt and padding included, because a compiled backend (Neuron) would recompile for every new number of positions.
A CPU runs eagerly and gains nothing from that, and it pays: in DPO on HH-RLHF pairs, the prompts and padding are
most positions, and the torch fallback makes several passes over every (position x vocabulary) tile. Before this
patch, that head took about half of a DPO step (benchmarks/profile_step.py --workload dpo).

trl makes the choice with `trl.trainer.utils._use_triton(device)`, a name that module uses for that choice alone (the
kernels module keeps its own). `labelled_positions_only_on_cpu()` swaps in a function that also says yes
for CPU tensors. The kernels still run their torch fallback on CPU, so the per-token results are the same.
Canaries: tests/test_patches.py::test_trl_fused_lm_head_still_projects_every_position_on_cpu (fails when trl
changes the choice or uses the name for anything else) and ::test_compact_lm_head_gives_trls_log_probs_and_gradients.

The same fused head never calls the output head module, which FSDP2 on torch < 2.13 cannot take:
`fused_head_breaks_fsdp2()` says when llmtune must keep trl's fused head out of an FSDP run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from trl.trainer import utils as trl_utils

from llmtune.patches import applied

_trl_choice = trl_utils._use_triton


def _compact_positions(device: torch.device) -> bool:
    return device.type == "cpu" or _trl_choice(device)


@contextmanager
def labelled_positions_only_on_cpu() -> Iterator[None]:
    """While inside, trl's fused LM head skips unlabelled positions on CPU tensors too; trl's own choice is back
    afterwards, so nothing else in the process (another trainer, a user's own trl code) sees the swap."""
    previous = trl_utils._use_triton
    trl_utils._use_triton = _compact_positions
    try:
        yield
    finally:
        trl_utils._use_triton = previous


# The trainer methods that run the fused head: the loss (training and evaluation) and precomputed references.
_HEAD_METHODS = ("compute_loss", "compute_ref_log_probs")


def project_labelled_positions_only_on_cpu(trainer: Any) -> None:
    """Scope the swap to this trainer: each of its methods that runs the fused head enters
    `labelled_positions_only_on_cpu` for the call (the results are the same either way; only the work differs)."""
    applied(__name__)
    for name in _HEAD_METHODS:
        method = getattr(trainer, name, None)
        if method is not None:
            setattr(trainer, name, _scoped(method))


def _scoped(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with labelled_positions_only_on_cpu():
            return method(*args, **kwargs)

    return call


def fused_head_breaks_fsdp2() -> bool:
    """Whether this torch's FSDP2 fails with trl's fused head. Before torch 2.13, FSDP2 gathers a group of modules
    again only after every module in it ran forward; accelerate groups a tied output head with the input embedding,
    and the fused head reads the head's weight without calling it, so after the first sharded checkpoint save the
    embedding stays sharded and the next step fails with "got mixed torch.Tensor and DTensor" (seen on an H200
    with torch 2.11; torch 2.13 completes such groups from the root). Canary: tests/test_patches.py::
    test_fsdp2_gate_matches_whether_torch_gathers_a_tied_head_group_the_fused_head_skips."""
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) < Version("2.13")
