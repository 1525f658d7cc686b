"""Readers: turn a source (a local file or a hub set) into rows with their location.

Each reader yields `RawRow(file, line, data, error)`: `data` is a dict of column ->
value, or `error` says why the row could not be read (invalid JSON, a CSV row with
the wrong number of fields). `line` is the 1-based line of the row in its file (for
parquet and hub sets, the 1-based row number), so every problem can be reported as
`file:line: reason`.

Text files are decoded robustly: each line is read as UTF-8 and, where that fails,
as Latin-1 (the public FPB files are Latin-1, the widely shared `all-data.csv` has a
few stray non-UTF-8 bytes). Nothing is lost or crashes; the number of such lines is
reported in `SourceInfo.latin1_lines`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from finlora.cli import flag
from finlora.errors import SourceError

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "fpb-txt", "all-data-csv", "fiqa-json", "finlora")
_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "fpb-txt"}


@dataclass
class RawRow:
    file: str
    line: int
    data: dict | None = None
    error: str | None = None


@dataclass
class SourceInfo:
    latin1_lines: list[int] = field(default_factory=list)


def guess_format(path: str | Path) -> str:
    fmt = _BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise SourceError(f"{path}: cannot tell the format from the name; add {flag('--format F')} ({', '.join(FORMATS)})")
    return fmt


def decode_robust(raw: bytes, info: SourceInfo | None = None) -> str:
    """UTF-8 line by line, Latin-1 for the lines that are not UTF-8 (never fails)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    out = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(line.decode("latin-1"))
            if info is not None:
                info.latin1_lines.append(i)
    return "\n".join(out)


def _read_text(path: Path, info: SourceInfo) -> str:
    try:
        return decode_robust(path.read_bytes(), info)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror}") from None


# --- delimited text -----------------------------------------------------------------

def read_delimited(path: Path, delimiter: str = ",", header: list[str] | None = None,
                   info: SourceInfo | None = None) -> Iterator[RawRow]:
    """CSV/TSV with a header row (or the given column names when the file has none)."""
    info = info if info is not None else SourceInfo()
    text = _read_text(path, info)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    names = header
    prev_end = 0
    for record in reader:
        start, prev_end = prev_end + 1, reader.line_num
        if not record or all(not c.strip() for c in record):
            continue  # a blank line is not a row
        if names is None:
            names = [c.strip() for c in record]
            continue
        if len(record) != len(names):
            yield RawRow(str(path), start, error=f"{len(record)} fields, the header has {len(names)} ({', '.join(names)})")
            continue
        yield RawRow(str(path), start, dict(zip(names, record)))


def read_all_data_csv(path: Path, info: SourceInfo | None = None) -> Iterator[RawRow]:
    """The widely shared Financial PhraseBank `all-data.csv`: `label,content`, with or
    without a header line, Latin-1 bytes here and there."""
    with open(path, "rb") as f:
        first = next(csv.reader([f.readline().decode("latin-1")]), [])
    has_header = [c.strip().lower() for c in first] == ["label", "content"]
    return read_delimited(path, ",", header=None if has_header else ["label", "content"], info=info)


def read_fpb_txt(path: Path, info: SourceInfo | None = None) -> Iterator[RawRow]:
    """Financial PhraseBank's own files (`Sentences_50Agree.txt`): `sentence@label`, Latin-1."""
    info = info if info is not None else SourceInfo()
    text = _read_text(path, info)
    for i, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if "@" not in line:
            yield RawRow(str(path), i, error="no '@' separating sentence and label")
            continue
        sentence, label = line.rsplit("@", 1)
        yield RawRow(str(path), i, {"sentence": sentence.strip(), "label": label.strip()})


# --- JSON ------------------------------------------------------------------------------

def read_jsonl(path: Path, info: SourceInfo | None = None) -> Iterator[RawRow]:
    info = info if info is not None else SourceInfo()
    text = _read_text(path, info)
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield RawRow(str(path), i, error=f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield RawRow(str(path), i, error=f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield RawRow(str(path), i, obj)


def _top_level_items(text: str) -> Iterator[tuple[int, str | None, object]]:
    """(line, key, value) of each element of a top-level JSON array or object.

    The caller has checked that `text` is valid JSON."""
    dec = json.JSONDecoder()
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(0)
    opener = text[i]
    closer = "]" if opener == "[" else "}"
    i = skip(i + 1)
    line = 1 + text.count("\n", 0, i)
    last = i
    while i < n and text[i] != closer:
        key = None
        if opener == "{":
            key, i = dec.raw_decode(text, i)
            i = skip(i)
            i = skip(i + 1)  # ':'
        line += text.count("\n", last, i)
        last = i
        value, i = dec.raw_decode(text, i)
        yield line, key, value
        i = skip(i)
        if i < n and text[i] == ",":
            i = skip(i + 1)


def read_json(path: Path, info: SourceInfo | None = None) -> Iterator[RawRow]:
    """A JSON array of objects (or an object of objects, or {"data": [...]})."""
    info = info if info is not None else SourceInfo()
    text = _read_text(path, info)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        yield RawRow(str(path), e.lineno, error=f"invalid JSON: {e.msg} (column {e.colno})")
        return
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and len(doc) == 1:
        # {"data": [...]}: line numbers of the inner list
        start = text.index("[", text.index('"data"'))
        items = ((line + text.count("\n", 0, start), k, v) for line, k, v in _top_level_items(text[start:]))
    elif isinstance(doc, (list, dict)):
        items = _top_level_items(text)
    else:
        yield RawRow(str(path), 1, error=f"expected a JSON array of objects, got {type(doc).__name__}")
        return
    for line, key, value in items:
        if not isinstance(value, dict):
            yield RawRow(str(path), line, error=f"expected a JSON object, got {type(value).__name__}")
            continue
        yield RawRow(str(path), line, value if key is None else {"_id": key, **value})


def read_fiqa_json(path: Path, info: SourceInfo | None = None, kind: str | None = None) -> Iterator[RawRow]:
    """FiQA 2018 task 1 (`task1_post_ABSA_train.json`, `task1_headline_ABSA_train.json`):
    {"id": {"sentence": ..., "info": [{"target", "aspects", "sentiment_score": "0.5"}, ...]}}.

    Yields `{"sentence", "sentiment_score", "type"}`; the score of the first aspect is the
    row's score (FinGPT's choice); `type` is "post" or "headline" from the file name."""
    if kind is None:
        kind = "headline" if "headline" in Path(path).name.lower() else "post"
    for row in read_json(path, info):
        if row.error:
            yield row
            continue
        d = row.data
        inf = d.get("info")
        score = inf[0].get("sentiment_score") if isinstance(inf, list) and inf and isinstance(inf[0], dict) else d.get("sentiment_score")
        out = {"sentence": d.get("sentence"), "sentiment_score": score, "type": kind}
        if out["sentence"] is None:
            out.pop("sentence")
        if score is None:
            out.pop("sentiment_score")
        yield RawRow(row.file, row.line, out)


# --- columnar and hub ------------------------------------------------------------------

def read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a readable parquet file: {e}") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield RawRow(str(path), i, row)


def load_hf(name: str, config: str | None = None, split: str = "train", data_files=None,
            revision: str | None = None):
    """`datasets.load_dataset(name, config, split=split)`: a hub set, or a packaged builder
    ("json", "csv", "parquet") on `data_files` (local paths, URLs or hf:// paths)."""
    from datasets import load_dataset

    kw = {"split": split}
    if data_files is not None:
        kw["data_files"] = data_files
    if revision is not None:
        kw["revision"] = revision
    return load_dataset(name, config, **kw)


def hf_rows(ds, where: str) -> Iterator[RawRow]:
    for i, row in enumerate(ds, start=1):
        yield RawRow(where, i, dict(row))


def hub_dataset(hub, split: str):
    """One split of a registry source (`tasks.HubSource`) as a `datasets.Dataset`; SourceError
    when it cannot be loaded (offline, missing, renamed)."""
    files = dict(hub.data_files)
    if hub.data_files and split not in files:
        raise SourceError(f"hf:{hub.where}: the registry names no file for split {split!r}")
    try:
        return load_hf(hub.name, hub.config, split, data_files={split: files[split]} if files else None,
                       revision=hub.revision)
    except Exception as e:  # noqa: BLE001 - one clear message, whatever datasets raised
        raise SourceError(f"cannot load hf:{hub.where}[{split}]: {type(e).__name__}: {str(e)[:300]}") from None


def hub_rows(hub, split: str) -> list[RawRow]:
    """All rows of one split of a registry source."""
    return list(hf_rows(hub_dataset(hub, split), f"hf:{hub.where}[{split}]"))


def read(fmt: str, path: str | Path, info: SourceInfo | None = None) -> Iterator[RawRow]:
    """Rows of a local file in one of FORMATS."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if fmt not in FORMATS:
        raise SourceError(f"unknown format {fmt!r}; formats are: {', '.join(FORMATS)}")
    info = info if info is not None else SourceInfo()
    if fmt == "parquet":
        return read_parquet(path)
    if fmt in ("csv", "tsv"):
        return read_delimited(path, "," if fmt == "csv" else "\t", info=info)
    readers = {"jsonl": read_jsonl, "finlora": read_jsonl, "json": read_json, "fpb-txt": read_fpb_txt,
               "all-data-csv": read_all_data_csv, "fiqa-json": read_fiqa_json}
    return readers[fmt](path, info)
