"""Upstream against ours: the output head and its loss for SFT with a frozen head (LoRA, QLoRA), forward and
backward, on the head of SmolLM2-135M (576 x 49,152).

trl 1.16's SFT loss (`loss_type="nll"`, formerly "chunked_nll"; its default) runs the head in vocabulary chunks
without materialising the logits; on a Triton device it scores only the positions that carry a loss ("compact"),
elsewhere every position. llmtune's head loss (llmtune/kernels/head_loss.py, used by patches/trl_labelled_logits.py
off CUDA) scores only the labelled positions, a block of rows at a time, with the input gradient computed in the
same pass. The plain way - logits of the labelled positions, then F.cross_entropy - is the reference for the loss.

    .venv/bin/python benchmarks/head_kernels.py                 # CPU: ~1 minute
    .venv/bin/python benchmarks/head_kernels.py --device cuda   # when a GPU is lent

Prints a table (median seconds of forward + backward, the loss's difference from the plain one) and writes
benchmarks/results/head_kernels.json with the CPU named.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain(hidden, weight, labels):
    mask = labels != -100
    return F.cross_entropy(hidden[mask] @ weight.T, labels[mask], reduction="sum")


def trl_chunked(compact: bool):
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    def loss(hidden, weight, labels):
        mask = labels != -100
        rows = hidden[mask] if compact else hidden
        targets = labels[mask] if compact else labels.clamp(min=0)
        log_probs = _ChunkedLogProbFunction.apply(rows, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                                  1.0, ("log_probs",))[0]
        return -(log_probs if compact else log_probs.masked_fill(~mask, 0)).sum()

    return loss


def llmtune_head(hidden, weight, labels, _cache={}):  # noqa: B006 - the packed head, made once as in training
    from llmtune.kernels.frozen_linear import FrozenLinear
    from llmtune.kernels.head_loss import HeadWorkspace, head_cross_entropy

    if "head" not in _cache:
        _cache["head"], _cache["workspace"] = FrozenLinear.cast(weight, None, weight.dtype), HeadWorkspace()
    mask = labels != -100
    return head_cross_entropy(hidden[mask], _cache["head"], labels[mask], _cache["workspace"])[0]


def timed(loss_of, hidden, weight, labels, repeats: int) -> tuple[float, float]:
    seconds, value = [], 0.0
    for _ in range(repeats + 1):  # the first call warms up (packing, allocations): not counted
        leaf = hidden.detach().requires_grad_()
        sync(hidden.device)
        started = time.perf_counter()
        loss = loss_of(leaf, weight, labels)
        loss.backward()
        sync(hidden.device)
        seconds.append(time.perf_counter() - started)
        value = float(loss.detach())
    return statistics.median(seconds[1:]), value


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=2048, help="positions in the batch (a padding-free row)")
    parser.add_argument("--labelled", type=float, default=0.45, help="share that carries a loss (Alpaca's answers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "head_kernels.json"))
    args = parser.parse_args()

    from speed import machine, rewrite_results_md

    from llmtune.run.files import write_json, write_text

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.positions, 576, generator=generator).to(device)
    weight = (torch.randn(49152, 576, generator=generator) * 0.02).to(device)
    labels = torch.randint(0, 49152, (args.positions,), generator=generator)
    labels[torch.rand(args.positions, generator=generator) > args.labelled] = -100
    labels = labels.to(device)
    candidates = {"plain (labelled logits + cross_entropy)": plain,
                  "trl nll, every position (trl off Triton)": trl_chunked(compact=False),
                  "trl nll, labelled only (trl on Triton)": trl_chunked(compact=True)}
    if device.type == "cpu":
        candidates["llmtune head loss, labelled only"] = llmtune_head
    reference = None
    rows = []
    print(f"{args.positions} positions, {int((labels != -100).sum())} labelled, head 49152 x 576, {device}")
    print(f"{'kernel':<44} {'fwd+bwd s':>10} {'vs plain':>9} {'loss - plain':>13}")
    for name, loss_of in candidates.items():
        seconds, value = timed(loss_of, hidden, weight, labels, args.repeats)
        reference = reference or (seconds, value)
        rows.append({"kernel": name, "seconds": seconds, "speed_vs_plain": reference[0] / seconds,
                     "loss_difference": value - reference[1]})
        print(f"{name:<44} {seconds:10.4f} {reference[0] / seconds:8.2f}x {value - reference[1]:13.3g}")
    record = {"device": str(device), "cpu": machine(), "positions": args.positions,
              "labelled": int((labels != -100).sum()), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    write_json(Path(args.out), record)
    if device.type == "cpu":  # the table RESULTS.md shows
        write_text(Path(args.out).with_suffix(".md"), render(record))
        rewrite_results_md()
    return 0


def render(record: dict) -> str:
    lines = [f"`benchmarks/head_kernels.py`: the output head and its loss, forward + backward, SmolLM2-135M's head "
             f"(49,152 x 576, frozen as in LoRA), {record['positions']:,} positions of which {record['labelled']:,} "
             f"carry a loss; {record['cpu']}, torch {record['torch']}.", "",
             "| kernel | seconds (median) | vs plain | loss - plain |", "|---|---|---|---|"]
    for row in record["rows"]:
        lines.append(f"| {row['kernel']} | {row['seconds']:.3f} | {row['speed_vs_plain']:.2f}x | "
                     f"{row['loss_difference']:.2g} |")
    lines += ["", "Decisions:",
              "- Output head + loss: off CUDA llmtune keeps its own (patches/trl_labelled_logits.py with "
              "kernels/head_loss.py): trl's CPU path scores every position and is the slowest here, and even trl's "
              "compact path (labelled positions only, which it takes on Triton devices) is slower than llmtune's. "
              "On CUDA trl's compact chunked head is used, now named explicitly (`loss_type=\"nll\"` in the SFT "
              "arguments) instead of inherited from trl's default.",
              "- Attention: torch's `varlen_attn` (cu_seqlens, no mask) against llmtune's one masked SDPA call per "
              "layer is a CUDA-only comparison; no GPU was lent since it was written, so it is not measured and "
              "llmtune's masked call stays (`python benchmarks/sdpa_kernels.py` on a GPU lease)."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
