"""Readers: turn a source (a local file or a hub set) into rows with their location.

Each reader yields `RawRow(file, line, data, error)`: `data` is a dict of column ->
value, or `error` says why the row could not be read. `line` is the 1-based line of the
row in its file (for parquet and hub sets, the 1-based row number), so every problem can
be reported as `file:line: reason`. Text is read line by line as UTF-8, else Latin-1,
and says which lines were Latin-1 (docs/DATA.md).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from finlora.cli import flag
from finlora.errors import SourceError
from finlora.recipes import rel

_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "fpb-txt"}
_SEPARATORS = re.compile(r"[\s,:]*")  # between the items of a JSON array or object (and a key and its value)


@dataclass
class RawRow:
    file: str
    line: int
    data: dict | None = None
    error: str | None = None


say = functools.partial(print, flush=True)  # progress on stdout, flushed: in order with the errors on stderr


def guess_format(path: str | Path) -> str:
    fmt = _BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise SourceError(f"{path}: cannot tell the format from the name; add {flag('--format F')} ({', '.join(FORMATS)})")
    return fmt


def _read_text(path: Path) -> str:
    """The file as UTF-8, line by line Latin-1 where that fails (never fails; the public FPB
    files are Latin-1, the widely shared `all-data.csv` has a few stray bytes)."""
    try:
        raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out, latin1 = [], []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(line.decode("latin-1"))
            latin1.append(i)
    say(f"note: {rel(path)}: {len(latin1)} line(s) not UTF-8, read as Latin-1 (lines {', '.join(map(str, latin1[:10]))}"
        f"{' ...' if len(latin1) > 10 else ''})")
    return "\n".join(out)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of the file's lines that are not blank."""
    for i, line in enumerate(_read_text(path).split("\n"), start=1):
        if line.strip():
            yield i, line.rstrip("\r")


# --- delimited text -----------------------------------------------------------------

def read_delimited(path: Path, delimiter: str = ",", header: list[str] | None = None) -> Iterator[RawRow]:
    """CSV/TSV with a header row, or the given column names (a first record that repeats them is the header).

    TSV has no quoting: a quote is text. CSV is read strictly: an unclosed quote would otherwise
    take the rest of the file into one field."""
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    names, first, prev_end = header, True, 0
    try:
        for record in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not record or all(not c.strip() for c in record):
                continue  # a blank line is not a row
            is_header, first = first and (names is None or [c.strip().lower() for c in record] == names), False
            if is_header:
                names = names or [c.strip() for c in record]
                continue
            if len(record) != len(names):
                yield RawRow(str(path), start, error=f"{len(record)} fields, the header has {len(names)} ({', '.join(names)})")
                continue
            yield RawRow(str(path), start, dict(zip(names, record)))
    except csv.Error as e:
        raise SourceError(f"{path}:{prev_end + 1}: cannot read the record starting here: {e}; close its quoted field "
                          '(a quote inside one is written ""), or give the file as JSONL') from None


def read_fpb_txt(path: Path) -> Iterator[RawRow]:
    """Financial PhraseBank's own files (`Sentences_50Agree.txt`): `sentence@label`, Latin-1."""
    for i, line in _lines(path):
        if "@" not in line:
            yield RawRow(str(path), i, error="no '@' separating sentence and label")
            continue
        sentence, label = line.rsplit("@", 1)
        yield RawRow(str(path), i, {"sentence": sentence.strip(), "label": label.strip()})


# --- JSON ------------------------------------------------------------------------------

def _row(path: Path, line: int, obj) -> RawRow:
    if isinstance(obj, dict):
        return RawRow(str(path), line, obj)
    return RawRow(str(path), line, error=f"expected a JSON object, got {type(obj).__name__}")


def read_jsonl(path: Path) -> Iterator[RawRow]:
    for i, line in _lines(path):
        try:
            yield _row(path, i, json.loads(line))
        except json.JSONDecodeError as e:
            yield RawRow(str(path), i, error=f"invalid JSON: {e.msg} (column {e.colno})")


def read_json(path: Path) -> Iterator[RawRow]:
    """A JSON array of objects (or an object of objects, or {"data": [...]}), each row at the
    line where its object starts."""
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        yield RawRow(str(path), e.lineno, error=f"invalid JSON: {e.msg} (column {e.colno})")
        return
    if not isinstance(doc, (list, dict)):
        yield RawRow(str(path), 1, error=f"expected a JSON array of objects, got {type(doc).__name__}")
        return
    # The document is valid: json decodes each item where it starts; only the separators between them are skipped.
    i = _SEPARATORS.match(text).end()
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and len(doc) == 1:
        i = text.index("[", text.index('"data"'))
    dec = json.JSONDecoder()
    keyed = text[i] == "{"
    line = 1  # the line of text[counted]
    counted = 0
    i = _SEPARATORS.match(text, i + 1).end()
    while text[i] not in "]}":
        key = None
        if keyed:
            key, i = dec.raw_decode(text, i)
            i = _SEPARATORS.match(text, i).end()
        line += text.count("\n", counted, i)
        counted = i
        value, i = dec.raw_decode(text, i)
        i = _SEPARATORS.match(text, i).end()
        if key is not None and isinstance(value, dict):
            value = {"_id": key, **value}
        yield _row(path, line, value)


def read_fiqa_json(path: Path) -> Iterator[RawRow]:
    """FiQA 2018 task 1 (`task1_post_ABSA_train.json`, `task1_headline_ABSA_train.json`):
    {"id": {"sentence": ..., "info": [{"target", "aspects", "sentiment_score": "0.5"}, ...]}}.

    Yields `{"sentence", "sentiment_score", "type"}`; the score of the first aspect is the
    row's score (FinGPT's choice); `type` is "post" or "headline" from the file name."""
    kind = "headline" if "headline" in Path(path).name.lower() else "post"
    for row in read_json(path):
        if row.error:
            yield row
            continue
        d = row.data
        inf = d.get("info")
        score = inf[0].get("sentiment_score") if isinstance(inf, list) and inf and isinstance(inf[0], dict) else d.get("sentiment_score")
        out = {"sentence": d.get("sentence"), "sentiment_score": score, "type": kind}
        yield RawRow(row.file, row.line, {k: v for k, v in out.items() if v is not None})


# --- columnar and hub ------------------------------------------------------------------

def read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a readable parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield RawRow(str(path), i, row)


def hub_rows(hub, split: str) -> list[RawRow]:
    """All rows of one split of a registry source (`tasks.HubSource`), read by `datasets.load_dataset`
    (a hub set, or a packaged builder on its `data_files`); SourceError when it cannot be loaded
    (offline, missing, renamed)."""
    from datasets import load_dataset

    where = f"hf:{hub.where}[{split}]"
    try:
        ds = load_dataset(hub.name, split=split, data_files=hub.data_files)
    except Exception as e:  # noqa: BLE001 - one clear message, whatever datasets raised
        raise SourceError(f"cannot load {where}: {type(e).__name__}: {str(e)[:300]}") from None
    return [RawRow(where, i, dict(row)) for i, row in enumerate(ds, start=1)]


READERS = {"csv": read_delimited, "tsv": lambda p: read_delimited(p, "\t"), "json": read_json, "jsonl": read_jsonl,
           "parquet": read_parquet, "fpb-txt": read_fpb_txt,
           # the widely shared Financial PhraseBank `all-data.csv`, with or without its header line
           "all-data-csv": lambda p: read_delimited(p, header=["label", "content"]),
           "fiqa-json": read_fiqa_json, "finlora": read_jsonl}
FORMATS = tuple(READERS)


def read(fmt: str, path: str | Path) -> Iterator[RawRow]:
    """Rows of a local file in one of FORMATS (`--format` takes no other)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    return READERS[fmt](path)
