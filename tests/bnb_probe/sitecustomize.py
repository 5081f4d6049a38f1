"""Loaded by test subprocesses when the suite runs with --cpu-bf16=on (conftest puts this folder on PYTHONPATH):
bitsandbytes then behaves as on a CPU with avx512_bf16 - its 4-bit layers want to repack their weights for CPU
inference - whatever CPU the tests run on."""

import os

if os.environ.get("LLMTUNE_TEST_BNB_AVX512BF16") == "1":
    try:
        import bitsandbytes.nn.modules as _modules

        _modules.has_avx512bf16 = lambda: True
    except Exception:  # bitsandbytes absent or broken: the tests that need it say so themselves
        pass
