"""An Ollama Modelfile for an exported GGUF: the training chat template translated to Ollama's Go template, the
default system prompt it injects, and the stop strings - so the model talks in Ollama as it was trained to.

The Jinja template is not parsed. It is rendered with marker contents, and each role's text before and after its
content is read off the result; the translation is then checked on several conversations and refused when the
template does anything per-conversation (merging the system prompt into the first user turn, say) that a
per-message Go template would get wrong.
"""

from __future__ import annotations

import json
from typing import Any

from llmtune.errors import LlmtuneError

ROLES = ("system", "user", "assistant")
MARK = "\u2063{}\u2063"  # an invisible separator no template adds on its own


def modelfile(tokenizer: Any, gguf_name: str, stop_texts: list[str]) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE, SYSTEM (if the template has a default) and stops."""
    pieces, default_system = template_pieces(tokenizer)
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(pieces)}"""']
    if default_system:
        _check_quotable(default_system, "default system prompt")
        lines.append(f'SYSTEM """{default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(text)}" for text in stop_texts]
    return "\n".join(lines) + "\n"


def template_pieces(tokenizer: Any) -> tuple[dict[str, tuple[str, str]], str | None]:
    """({role: (text before content, text after content), 'generation': (prompt for the reply, '')},
    default system prompt or None), read from the tokenizer's chat template and verified."""
    if not tokenizer.chat_template:
        raise LlmtuneError("The run's tokenizer has no chat template, so there is nothing to translate into a "
                           "Modelfile TEMPLATE. Export with --format gguf and prompt the model with raw text.")

    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    def render(messages: list[dict[str, str]], generation: bool = False) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        # A template that opens with the bos token (Llama 3) leaves it to the runtime, which adds it itself.
        return text[len(bos):] if adds_bos and text.startswith(bos) else text

    system = {"role": "system", "content": MARK.format("s")}
    user = {"role": "user", "content": MARK.format("u")}
    reply = {"role": "assistant", "content": MARK.format("a")}
    try:
        prefix = render([system])
        with_user = render([system, user])
        with_reply = render([system, user, reply])
        prompt = render([system, user], generation=True)
        without_system = render([user])
    except Exception as exc:  # jinja raises on conversations a template does not accept (e.g. no system role)
        raise _untranslatable(f"rendering a system / user / assistant conversation failed: {exc}") from exc
    pieces = {
        "system": _split(prefix, system["content"]),
        "user": _split(with_user[len(prefix):], user["content"]),
        "assistant": _split(with_reply[len(with_user):], reply["content"]),
        "generation": (prompt[len(with_user):], ""),
    }
    injected = without_system[: len(without_system) - len(with_user) + len(prefix)]
    default_system = None
    before, after = pieces["system"]
    if injected:
        if not (injected.startswith(before) and injected.endswith(after)):
            raise _untranslatable("the system prompt it adds when there is none is not a system message")
        default_system = injected[len(before): len(injected) - len(after)]
    _verify(pieces, default_system, render)
    return pieces, default_system


def go_template(pieces: dict[str, tuple[str, str]]) -> str:
    """The Go template Ollama renders for each request (it puts the Modelfile SYSTEM first when the request
    has no system message of its own). A final assistant message is left open: Ollama continues it."""
    parts = ["{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"]
    for index, role in enumerate(ROLES):
        before, after = pieces[role]
        parts.append(f'{{{{ {"if" if index == 0 else "else if"} eq $m.Role "{role}" }}}}')
        if role == "assistant":
            parts.append(f"{_literal(before)}{{{{ $m.Content }}}}{{{{ if not $last }}}}{_literal(after)}{{{{ end }}}}")
        else:
            parts.append(f"{_literal(before)}{{{{ $m.Content }}}}{_literal(after)}")
    parts.append("{{ end }}")
    parts.append(f'{{{{ if and $last (ne $m.Role "assistant") }}}}{_literal(pieces["generation"][0])}{{{{ end }}}}')
    parts.append("{{ end }}")
    return "".join(parts)


def _split(text: str, content: str) -> tuple[str, str]:
    if text.count(content) != 1:
        raise _untranslatable("a message's content does not appear exactly once where the message is rendered")
    before, after = text.split(content)
    return before, after


def _verify(pieces: dict[str, tuple[str, str]], default_system: str | None, render: Any) -> None:
    """The per-message pieces must rebuild the template's own rendering of longer conversations."""
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}],
        [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "3"}],
    ]
    for messages in conversations:
        shown = messages
        if messages[0]["role"] != "system" and default_system is not None:
            shown = [{"role": "system", "content": default_system}, *messages]
        rebuilt = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in shown)
        rebuilt += pieces["generation"][0]
        if rebuilt != render(messages, True):
            raise _untranslatable("its rendering of a multi-turn conversation is not one block per message (it adds "
                                  "something once per conversation, such as a leading bos token or a system prompt "
                                  "inside the first user turn)")


def _literal(text: str) -> str:
    """Text as it goes into the Go template: verbatim, unless it holds template delimiters."""
    _check_quotable(text, "chat template")
    return text if "{{" not in text and "}}" not in text else "{{ " + json.dumps(text) + " }}"


def _check_quotable(text: str, what: str) -> None:
    if '"""' in text:
        raise LlmtuneError(f'The {what} contains """, which a Modelfile cannot quote.')


def _untranslatable(why: str) -> LlmtuneError:
    return LlmtuneError(
        f"The run's chat template cannot be translated into an Ollama TEMPLATE: {why}. Export with "
        "--format gguf instead - the GGUF file carries the original template, which llama.cpp runs (--jinja) - "
        "and write the Modelfile TEMPLATE by hand."
    )
