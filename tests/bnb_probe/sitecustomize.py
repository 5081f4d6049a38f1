"""Loaded by test processes when the suite runs with --cpu-bf16=on/off (conftest puts this folder on PYTHONPATH and
runs this file in-process): bitsandbytes then answers its avx512_bf16 probe as asked - on, its 4-bit layers want to
repack their weights for CPU inference as on such a CPU - whatever CPU the tests run on. bitsandbytes is patched when
something imports it, so processes that never need it do not pay for importing it."""

import importlib.abc
import importlib.machinery
import os
import sys

_FORCED = os.environ.get("LLMTUNE_TEST_BNB_AVX512BF16")
_MODULE = "bitsandbytes.nn.modules"


def _answer(module) -> None:
    module.has_avx512bf16 = lambda: _FORCED == "1"


class _ForceProbe(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _answer(module)

        spec.loader.exec_module = exec_module
        return spec


if _FORCED in ("0", "1"):
    if _MODULE in sys.modules:
        _answer(sys.modules[_MODULE])
    elif not any(isinstance(finder, _ForceProbe) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ForceProbe())
