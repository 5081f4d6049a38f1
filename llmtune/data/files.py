"""Reading the user's own files, with errors that say where a file goes wrong: the byte that is not UTF-8 (with
the command that converts the file), the JSON line that does not parse - instead of a library's
"An error occurred while generating the dataset"."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

from llmtune.errors import LlmtuneError

TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".jinja")


def read_text_file(path: str | Path, key: str) -> str:
    """A whole UTF-8 text file (e.g. lm.perplexity_file), or an error naming the key, the file and the bad byte."""
    file = Path(path)
    if not file.is_file():
        raise LlmtuneError(f"'{key}' is '{path}', but that file does not exist.")
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _encoding_error(key, file, exc.start, data) from None


def open_maybe_compressed(path: Path):
    """A binary reader of the file's content; .gz files are read decompressed."""
    if path.suffix.lower() == ".gz":
        import gzip

        return gzip.open(path, "rb")
    return path.open("rb")


def check_utf8(path: Path, key: str) -> None:
    """Raise a one-paragraph error at the first byte of the file that is not valid UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, head = 0, b""
    with open_maybe_compressed(path) as handle:
        while chunk := handle.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                position = offset - pending + exc.start
                raise _encoding_error(key, path, position, head + chunk, base=offset - len(head)) from None
            offset += len(chunk)
            head = chunk[-4:]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _encoding_error(key, path, offset - len(decoder.getstate()[0]), b"") from None


def _encoding_error(key: str, path: Path, position: int, data: bytes, base: int = 0) -> LlmtuneError:
    local = position - base
    byte = f"byte 0x{data[local]:02x} " if 0 <= local < len(data) else ""
    utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff") and base == 0
    guess = "utf-16" if utf16 else "latin1"
    return LlmtuneError(
        f"'{key}' is '{path}', which is not UTF-8 text: {byte}at byte offset {position:,} is not valid UTF-8"
        f"{' (the file starts with a UTF-16 byte-order mark)' if utf16 else ''}. llmtune reads text files as UTF-8. "
        f"Convert it, e.g. `iconv -f {guess} -t utf-8 '{path}' > '{path.with_suffix('')}.utf8{path.suffix}'` "
        "(use the file's real encoding in place of " + guess + "; `file -i` often tells it), and point the recipe "
        "at the converted file."
    )


def first_bad_json_row(path: Path) -> str | None:
    """Where a .json / .jsonl file stops being valid JSON: 'line 3: Expecting ...', or None if it parses."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document (an array of rows)
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
        return None
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is legal inside JSON strings
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}, column {exc.colno}: {exc.msg} (every line of a .jsonl file must be one JSON object)"
        if not isinstance(row, dict):
            return f"line {number} holds a JSON {type(row).__name__}, not an object of column: value pairs"
    return None


def unreadable(path: Path, key: str, exc: BaseException) -> LlmtuneError:
    """Explain why a data file could not be loaded: encoding, the bad JSON row, or the library's reason."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        check_utf8(path, key)  # raises with the offset when that is the problem
    if path.suffix.lower() in (".json", ".jsonl"):
        row = first_bad_json_row(path)
        if row:
            return LlmtuneError(f"'{key}' is '{path}', which is not valid JSON at {row}. Fix or remove that row.")
    cause = exc.__cause__ or exc
    return LlmtuneError(
        f"'{key}': could not read '{path}' as {path.suffix} data: {type(cause).__name__}: {cause}"
    )
