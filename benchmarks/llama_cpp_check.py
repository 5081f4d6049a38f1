"""An exported GGUF generating through llama.cpp itself (llama-cpp-python) against `llmtune generate` on the run.

For each prompt, three greedy replies: transformers on the run (what `llmtune generate` prints), llama.cpp given
the prompt as llmtune renders it, and llama.cpp's own chat API, which formats the conversation with the chat
template stored in the GGUF file. All three should be the same text; the table says where they part.

llama-cpp-python is not an llmtune dependency: it has no wheels on the registry and compiles llama.cpp when it
installs (about 10 minutes on 2 cores). Install it beside llmtune, then run:

    .venv/bin/pip install llama-cpp-python
    .venv/bin/python benchmarks/llama_cpp_check.py runs/my-sft-run --quant f16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Name three primary colours."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="An llmtune causal-LM run directory.")
    parser.add_argument("--quant", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--prompt", action="append", help="Prompts (default: three README-style questions).")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "llama_cpp_check.json"))
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed: `pip install llama-cpp-python` (compiles llama.cpp).")
        return 2
    from transformers import AutoModelForCausalLM

    from llmtune.inference.generation import encode_prompt, generate
    from llmtune.inference.trained import load_trained
    from llmtune.run.run_dir import _cpu_name
    from llmtune.ship.export import export

    run = Path(args.run)
    prompts = args.prompt or PROMPTS
    gguf_path = run / "export" / f"{run.resolve().name}-{args.quant}.gguf"
    if not gguf_path.is_file():
        export(run, "gguf", args.quant)
    model, tokenizer, _ = load_trained(run, AutoModelForCausalLM)
    expected = generate(model, tokenizer, prompts, args.max_new_tokens, chat=True)

    llm = Llama(model_path=str(gguf_path), n_ctx=1024, n_threads=os.cpu_count(), seed=0, verbose=False)
    greedy = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
              "max_tokens": args.max_new_tokens}
    rows = []
    for prompt, reference in zip(prompts, expected):
        started = time.perf_counter()
        rendered = tokenizer.decode(encode_prompt(tokenizer, prompt, chat=True)["input_ids"][0])
        raw = llm.create_completion(rendered, **greedy)["choices"][0]["text"]
        chat = llm.create_chat_completion([{"role": "user", "content": prompt}], **greedy)
        rows.append({
            "prompt": prompt, "transformers": reference["completion"], "llama_cpp_prompt": raw,
            "llama_cpp_chat_template": chat["choices"][0]["message"]["content"],
            "seconds": round(time.perf_counter() - started, 2),
        })
    for row in rows:
        row["same_prompt"] = row["llama_cpp_prompt"].strip() == row["transformers"].strip()
        row["same_chat"] = row["llama_cpp_chat_template"].strip() == row["transformers"].strip()
        print(f"\n## {row['prompt']}\ntransformers : {row['transformers']!r}\nllama.cpp    : "
              f"{row['llama_cpp_prompt']!r}\nllama.cpp chat: {row['llama_cpp_chat_template']!r}")
    print("\n| prompt | same text (llmtune prompt) | same text (GGUF chat template) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['prompt']} | {row['same_prompt']} | {row['same_chat']} |")
    result = {"run": str(run), "gguf": str(gguf_path), "quant": args.quant, "cpu": _cpu_name(),
              "max_new_tokens": args.max_new_tokens, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nWrote {args.out}")
    return 0 if all(r["same_prompt"] and r["same_chat"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
