"""Turn one source row into a FinLoRA example, or say exactly what is wrong with it.

Labels are mapped at the source (`Mapping.label_map`, FiQA's score thresholds), known
labelling errors repaired on request (`Mapping.swap`), and the answer checked against the
task (docs/DATA.md, Validation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from finlora.cli import flag
from finlora.data.sources import RawRow
from finlora.data.tasks import Mapping, Task, fiqa_label

_INPUT_RE = re.compile(r"\nInput: (.*)\nAnswer: ?$", re.DOTALL)


@dataclass
class Example:
    context: str
    target: str
    text: str                              # the input text (duplicate and leakage checks)
    file: str
    line: int
    n_tokens: int | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class RowError(Exception):
    pass


def normalise(text: str) -> str:
    """Case and white space folded: the key for duplicates and train/test overlap."""
    return " ".join(text.casefold().split())


def input_text(context: str) -> str:
    """The `Input:` part of a FinLoRA context (the whole context when there is none)."""
    m = _INPUT_RE.search(context)
    return m.group(1) if m else context


def field_value(row: dict, name: str, *, allow=(str,)) -> object:
    """`row[name]`: present, not null or blank, of an `allow`ed type (RowError says which not)."""
    if name not in row:
        raise RowError(f"missing field {name!r}")
    v = row[name]
    if v is None or (isinstance(v, float) and math.isnan(v)):
        raise RowError(f"empty field {name!r} (null)")
    if isinstance(v, bool) or not isinstance(v, allow):
        want = " or ".join(t.__name__ for t in allow)
        raise RowError(f"wrong type for field {name!r}: {type(v).__name__}, expected {want}")
    if isinstance(v, str) and not v.strip():
        raise RowError(f"empty field {name!r}")
    return v


def _target(task: Task, m: Mapping, data: dict) -> str:
    if m.finlora:
        raw = field_value(data, "target")
    elif m.score_col:
        v = field_value(data, m.score_col, allow=(str, int, float))
        try:
            score = float(v)
        except ValueError:
            raise RowError(f"wrong type for field {m.score_col!r}: {v!r} is not a number") from None
        raw = fiqa_label(score)
    elif m.label_col:
        allow = (str, int) if m.label_map is not None else ((str, int, float) if task.answer_type == "number" else (str,))
        v = field_value(data, m.label_col, allow=allow)
        if m.label_map is not None:
            key = str(v).strip()
            if key in m.label_map:
                raw = m.label_map[key]
            elif isinstance(v, str) and task.labels and key.casefold() in {x.casefold() for x in task.labels}:
                raw = key  # already a label name: ids are mapped, names pass through
            else:
                names = f" nor one of {', '.join(task.labels)}" if task.labels else ""
                raise RowError(f"label {v!r} is neither one of the source's ids {', '.join(m.label_map)}{names}")
        else:
            raw = v if isinstance(v, str) else repr(v)
    else:
        raise RowError("no label column given")
    return raw.strip() if task.answer_type == "label" else raw


def check_target(task: Task, m: Mapping, target: str) -> str:
    if task.answer_type == "label":
        canon = {lab.casefold(): lab for lab in task.labels}
        if target.casefold() not in canon:
            raise RowError(f"label {target!r} is not one of {', '.join(task.labels)}")
        target = canon[target.casefold()]
        if m.swap and target in m.swap:
            a, b = m.swap
            target = b if target == a else a
    elif task.answer_type == "number":
        try:
            float(target.replace(",", ""))
        except ValueError:
            raise RowError(f"target {target!r} is not a number") from None
    return target


def convert_row(task: Task, m: Mapping, raw: RawRow) -> Example | Problem:
    if raw.error:
        return Problem(raw.file, raw.line, raw.error)
    data = raw.data
    try:
        if m.finlora:
            context = field_value(data, "context")
            text = input_text(context)
        else:
            text = field_value(data, m.text_col).strip()
            values = {"text": text}
            for name in task.fields:
                if name == "text":
                    continue
                if name in m.fields:
                    values[name] = str(field_value(data, m.fields[name])).strip()
                elif name in task.defaults:
                    values[name] = task.defaults[name]
                else:
                    raise RowError(f"no column for the template's {{{name}}} (add {flag(f'--field {name}=COLUMN')})")
            kind = str(data.get(m.kind_col)) if m.kind_col and data.get(m.kind_col) is not None else None
            context = task.render(values, kind)
        target = check_target(task, m, _target(task, m, data))
    except RowError as e:
        return Problem(raw.file, raw.line, str(e))
    return Example(context, target, text, raw.file, raw.line)
