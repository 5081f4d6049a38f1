"""What each GGUF weight type costs on SmolLM2-135M-Instruct: file size, the export check's numbers on its probe,
and how often the top token stays the same over 2,000 WikiText-2 tokens (and, where it changes, how close the
full-precision model's top two tokens were).

Each file is written by llmtune's exporter and read back by transformers, exactly as `llmtune export` checks it.

    .venv/bin/python benchmarks/gguf_quality.py --quants f32 f16 bf16 q8_0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quants", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gguf_quality.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.inference.generation import stop_token_ids
    from llmtune.models.sources import load_gguf, resolve_model
    from llmtune.run.run_dir import _cpu_name
    from llmtune.ship.export import _probe_text
    from llmtune.ship.gguf_file import verify_gguf, write_gguf

    path = resolve_model("smollm2-135m-instruct").path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(WIKITEXT.read_text()[: args.tokens * 8], return_tensors="pt")["input_ids"][:, : args.tokens]
    with torch.inference_mode():
        full = torch.cat([model(window).logits[0] for window in ids.split(500, dim=1)])
    top_two = full.topk(2, dim=-1).values
    gaps = top_two[:, 0] - top_two[:, 1]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for quant in args.quants:
            file = Path(folder) / f"smollm2-{quant}.gguf"
            write_gguf(model, tokenizer, file, quant, "smollm2", stop_token_ids(model))
            checks = verify_gguf(file, model, tokenizer, quant, _probe_text(tokenizer))
            loaded, _ = load_gguf(file)
            with torch.inference_mode():
                got = torch.cat([loaded(window).logits[0] for window in ids.split(500, dim=1)]).argmax(-1)
            changed = got != full.argmax(-1)
            rows.append({
                "quant": quant, "megabytes": round(file.stat().st_size / 1e6), **checks,
                "wikitext_tokens": int(ids.shape[1]),
                "wikitext_top1_agreement": round(1 - changed.float().mean().item(), 4),
                "largest_top2_gap_where_changed": round(gaps[changed].max().item(), 3) if changed.any() else None,
            })
            del loaded
    print(f"CPU: {_cpu_name()}; probe {rows[0]['probe_tokens']} tokens, logits up to {rows[0]['max_abs_logit']:.0f}\n")
    print("| quant | MB | probe: max diff vs stored weights | vs float32 | top-1 agreement, WikiText-2 | "
          "largest top-2 gap where changed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quant']} | {r['megabytes']} | {r['max_logit_diff_vs_stored_weights']:.1e} | "
              f"{r['max_logit_diff_vs_full_precision']:.3f} | {r['wikitext_top1_agreement']:.1%} | "
              f"{r['largest_top2_gap_where_changed']} |")
    Path(args.out).write_text(json.dumps({"cpu": _cpu_name(), "model": "SmolLM2-135M-Instruct", "rows": rows},
                                         indent=2) + "\n")
    print(f"\nWrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
