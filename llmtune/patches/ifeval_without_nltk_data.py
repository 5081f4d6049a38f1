"""IFEval's instruction checkers on a machine without nltk's downloadable tokenizer data.

lm-eval's `ifeval` checkers (lm_eval/tasks/ifeval/instructions_util.py) count sentences with nltk's trained Punkt
model and split words with `nltk.word_tokenize`; both read the 'punkt_tab' data package, which the nltk wheel does
not ship. The module downloads it when imported; offline that prints an error and the first reply checked raises
LookupError. Two checks need it: "length_constraints:number_sentences" (count_sentences) and
"change_case:capital_word_frequency" (word_tokenize).

When 'punkt_tab' is not installed, `ifeval_checkers()` imports the module without the download attempt if the
machine is offline (HF_HUB_OFFLINE=1) and then, for those two checks only:
- counts sentences with the checkers' own rule-based splitter (`split_into_sentences`, which another IFEval check
  already uses; it knows titles like "Dr.", acronyms, decimals and ellipses, as Punkt's trained model does);
- splits words with nltk's Treebank tokenizer over the whole reply - what `word_tokenize` does sentence by sentence,
  so the count of all-capital words only differs where a sentence boundary falls inside a token.
Scores can then differ slightly from lm-eval's on those two instruction kinds, and the results say so (run.json /
the results file list this patch). With the data installed (`python -m nltk.downloader punkt_tab`) nothing is
changed. Canary: tests/test_patches.py::test_lm_eval_ifeval_still_reads_nltk_punkt_data.
"""

from __future__ import annotations

import logging
import os
import types
from typing import Any

from llmtune.patches import applied

logger = logging.getLogger(__name__)


def punkt_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


def ifeval_checkers() -> Any:
    """lm-eval's IFEval checker module, usable with or without nltk's 'punkt_tab' data."""
    import nltk

    if punkt_installed():
        from lm_eval.tasks.ifeval import instructions_util

        return instructions_util
    download = nltk.download
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        nltk.download = lambda *args, **kwargs: False  # the import's download attempt: no network here
    try:
        from lm_eval.tasks.ifeval import instructions_util
    finally:
        nltk.download = download
    if not punkt_installed():  # still missing (offline, or the download failed)
        _use_rule_based_tokenizers(instructions_util)
    return instructions_util


def _use_rule_based_tokenizers(module: Any) -> None:
    if getattr(module, "_llmtune_rule_based", False):
        return
    import nltk
    from nltk.tokenize.destructive import NLTKWordTokenizer

    applied(__name__)
    logger.warning("nltk's 'punkt_tab' data is not installed: IFEval counts sentences with its own rule-based "
                   "splitter and splits words with nltk's Treebank tokenizer (two instruction kinds may score "
                   "slightly differently from lm-eval's). `python -m nltk.downloader punkt_tab` installs it.")

    class RuleBasedSentences:
        @staticmethod
        def tokenize(text: str) -> list[str]:
            return module.split_into_sentences(text)

    words = NLTKWordTokenizer()
    proxy = types.ModuleType("nltk")  # nltk as the checkers see it: everything nltk has, word_tokenize replaced
    proxy.__getattr__ = lambda name: getattr(nltk, name)  # type: ignore[method-assign]
    proxy.word_tokenize = words.tokenize
    module._get_sentence_tokenizer = lambda: RuleBasedSentences
    module.nltk = proxy
    module._llmtune_rule_based = True
