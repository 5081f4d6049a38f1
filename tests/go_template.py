"""Render Ollama chat templates in tests: the part of Go's text/template that Modelfiles use (range, if / else if
/ else, eq / ne / and / not / len / slice, variables, fields, string literals), and Ollama's rule that the
Modelfile SYSTEM comes first when a request has no system message. Written from the Go and Ollama documentation,
independently of llmtune's Modelfile writer, so a test can check what Ollama would feed the model."""

from __future__ import annotations

import json
import re
from typing import Any

ACTION = re.compile(r'{{-?\s*((?:"(?:\\.|[^"\\])*"|[^"}]|}(?!}))*?)\s*-?}}', re.S)  # quotes may hold }}
TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\(|\)|:=|[$.\w]+')


def render_ollama(template: str, messages: list[dict[str, str]], system: str | None = None) -> str:
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    nodes, rest = _parse(_lex(template), 0)
    assert rest == len(_lex(template)), "unbalanced {{ end }}"
    out: list[str] = []
    _run(nodes, {"$": {"Messages": messages}}, {"Messages": messages}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    items, position = [], 0
    for match in ACTION.finditer(template):
        items.append(("text", template[position:match.start()]))
        items.append(("action", match.group(1)))
        position = match.end()
    items.append(("text", template[position:]))
    return items


def _parse(items: list[tuple[str, str]], index: int) -> tuple[list, int]:
    """Nodes until a closing {{ end }} / {{ else ... }} (not consumed) or the end of the items."""
    nodes: list = []
    while index < len(items):
        kind, body = items[index]
        if kind == "text":
            nodes.append(("text", body))
            index += 1
        elif body == "end" or body.startswith("else"):
            return nodes, index
        elif body.startswith(("if ", "range ")):
            keyword, expression = body.split(" ", 1)
            branches, otherwise = [], []
            children, index = _parse(items, index + 1)
            branches.append((expression, children))
            while items[index][1].startswith("else"):
                condition = items[index][1][len("else"):].strip()
                children, index = _parse(items, index + 1)
                if condition.startswith("if "):
                    branches.append((condition[3:], children))
                else:
                    otherwise = children
            index += 1  # the {{ end }}
            nodes.append((keyword, branches, otherwise))
        else:
            nodes.append(("action", body))
            index += 1
    return nodes, index


def _run(nodes: list, variables: dict[str, Any], dot: Any, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "action":
            tokens = TOKEN.findall(node[1])
            if len(tokens) > 2 and tokens[1] == ":=":
                variables[tokens[0]] = _evaluate(tokens[2:], variables, dot)
            else:
                out.append(str(_evaluate(tokens, variables, dot)))
        elif node[0] == "if":
            for expression, children in node[1]:
                if _truthy(_evaluate(TOKEN.findall(expression), variables, dot)):
                    _run(children, variables, dot, out)
                    break
            else:
                _run(node[2], variables, dot, out)
        else:  # range $i, $m := PIPELINE
            header, pipeline = node[1][0][0].split(":=")
            names = [n.strip() for n in header.split(",")]
            for i, item in enumerate(_evaluate(TOKEN.findall(pipeline), variables, dot)):
                scope = {**variables, names[0]: i, names[-1]: item}
                _run(node[1][0][1], scope, item, out)


def _evaluate(tokens: list[str], variables: dict[str, Any], dot: Any) -> Any:
    values, position = [], 0
    while position < len(tokens):
        token = tokens[position]
        if token == "(":
            depth, end = 1, position + 1
            while depth:
                depth += {"(": 1, ")": -1}.get(tokens[end], 0)
                end += 1
            values.append(_evaluate(tokens[position + 1:end - 1], variables, dot))
            position = end
            continue
        values.append(token)
        position += 1
    head, args = values[0], [_value(v, variables, dot) for v in values[1:]]
    functions = {
        "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda a, b: b if _truthy(a) else a,
        "not": lambda a: not _truthy(a), "len": len, "slice": lambda seq, start: seq[start:],
    }
    if isinstance(head, str) and head in functions:
        return functions[head](*args)
    return _value(head, variables, dot)


def _value(token: Any, variables: dict[str, Any], dot: Any) -> Any:
    if not isinstance(token, str):
        return token  # an already evaluated parenthesised pipeline
    if token.startswith('"') or token.isdigit():
        return json.loads(token)
    if token.startswith("$"):
        name, _, fields = token.partition(".")
        value = variables[name]
    else:
        value, fields = dot, token[1:]
    for field in filter(None, fields.split(".")):
        value = value[field.lower()] if field.lower() in value else value[field]
    return value


def _truthy(value: Any) -> bool:
    return bool(value)
