"""WikiText-2 perplexity of SmolLM2-135M-Instruct: `llmtune eval` against an independent transformers loop.

The independent loop is the sliding-window recipe of the transformers perplexity guide, using the model's
own shifted loss; llmtune computes per-token cross-entropy itself. Both score the same windows.

    .venv/bin/python benchmarks/perplexity_check.py --max-length 1024 --stride 512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def independent_perplexity(model, tokenizer, text: str, max_length: int, stride: int) -> float:
    """The sliding-window loop from the transformers perplexity guide, using the model's own loss."""
    import torch

    encodings = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    seq_len = encodings.input_ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = encodings.input_ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids != -100).sum().item() - 1  # the model shifts labels left by one
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", default=str(REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"))
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "perplexity_check.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    cli = subprocess.run(
        [sys.executable, "-m", "llmtune", "eval", "smollm2-135m-instruct", "--text-file", args.text_file,
         "--max-length", str(args.max_length), "--stride", str(args.stride)],
        capture_output=True, text=True, check=True,
    )
    ours = json.loads(cli.stdout)
    llmtune_seconds = time.perf_counter() - start

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.models.sources import resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    start = time.perf_counter()
    reference = independent_perplexity(AutoModelForCausalLM.from_pretrained(path).eval(),
                                       AutoTokenizer.from_pretrained(path), Path(args.text_file).read_text(),
                                       args.max_length, args.stride)
    result = {
        "text_file": args.text_file, "max_length": args.max_length, "stride": args.stride,
        "tokens": ours["tokens"], "llmtune_perplexity": ours["perplexity"], "independent_perplexity": reference,
        "ratio": ours["perplexity"] / reference, "llmtune_seconds": llmtune_seconds,
        "independent_seconds": time.perf_counter() - start,
    }
    print(f"| llmtune eval | independent loop | ratio | tokens |\n|---|---|---|---|\n"
          f"| {result['llmtune_perplexity']:.3f} | {reference:.3f} | {result['ratio']:.5f} | {result['tokens']:,} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
