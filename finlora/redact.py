"""Keep secrets out of everything the project prints or writes.

A secret is the value of an environment variable whose name says it is one
(`*TOKEN*`, `*KEY*`, `*SECRET*`, `*PASSWORD*`, `*PASSWD*`, `*CREDENTIAL*`), at least
`MIN_LEN` characters long so that flags such as `...KEY=1` are left alone. Such values
are replaced by `[REDACTED]`:

- in Axolotl's stdout/stderr, which `finlora.launch` passes through `pump` (a `StreamRedactor`)
  chunk by chunk (bytes, not lines, so tqdm's `\\r` progress updates still stream);
- in Axolotl's `debug.log` tee, wrapped by the FinLoRA plugin (`RedactingFile`);
- in the text files of a finished (or failed) run's output folder (`redact_tree`),
  a final sweep that also removes well-known token formats (`PATTERNS`; tests/test_security.py
  scans the tracked tree and a run's logs for them).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

REDACTED = "[REDACTED]"
MIN_LEN = 8
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)

# Well-known credential formats: what the tree and the logs must never contain.
PATTERNS: dict[str, re.Pattern] = {
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "OpenAI-style key": re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----"),
}

TEXT_SUFFIXES = {".log", ".txt", ".json", ".jsonl", ".md", ".yaml", ".yml"}
LOG_SUFFIXES = {".log", ".txt"}  # token formats are removed from logs only: a tokenizer.json
# vocabulary could hold a string that merely looks like one
MAX_SWEEP_BYTES = 64 << 20


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-named variables in `env` (default: os.environ), longest first."""
    env = os.environ if env is None else env
    vals = {v for k, v in env.items() if SECRET_NAME.search(k) and v and len(v) >= MIN_LEN}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] | None = None, patterns: bool = True) -> str:
    for s in (secret_values() if secrets is None else secrets):
        text = text.replace(s, REDACTED)
    if patterns:
        for pat in PATTERNS.values():
            text = pat.sub(REDACTED, text)
    return text


class StreamRedactor:
    """Redacts byte chunks as they stream. A chunk's tail that could be the start of a
    secret is held back until the next chunk (or `flush`) decides; nothing else is
    delayed, so progress bars stay live."""

    def __init__(self, secrets: Iterable[str] | None = None):
        vals = secret_values() if secrets is None else list(secrets)
        self.secrets = sorted({s.encode() for s in vals if s}, key=len, reverse=True)
        self.prefixes = {s[:k] for s in self.secrets for k in range(1, len(s))}
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.secrets:
            return chunk
        buf = self.held + chunk
        for s in self.secrets:
            buf = buf.replace(s, REDACTED.encode())
        keep = 0
        for k in range(min(len(buf), max(map(len, self.secrets)) - 1), 0, -1):
            if buf[-k:] in self.prefixes:
                keep = k
                break
        self.held = buf[len(buf) - keep:] if keep else b""
        return buf[:len(buf) - keep] if keep else buf

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out


def pump(src: BinaryIO, dst, secrets: Iterable[str] | None = None) -> threading.Thread:
    """Copy `src` (a pipe) to `dst` (a binary or text stream) through a StreamRedactor,
    in a daemon thread; returns the started thread."""
    red = StreamRedactor(secrets)
    binary = getattr(dst, "buffer", None)

    def emit(data: bytes) -> None:
        if not data:
            return
        try:
            if binary is not None:
                binary.write(data)
                binary.flush()
            else:
                dst.write(data.decode("utf-8", "replace"))
                dst.flush()
        except (OSError, ValueError):  # our own stdout closed: keep draining the child
            pass

    def run() -> None:
        fd = src.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            emit(red.feed(chunk))
        emit(red.flush())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class RedactingFile:
    """A text file wrapper (for Axolotl's debug-log tee) that redacts what it writes."""

    def __init__(self, f, secrets: Iterable[str] | None = None):
        self._f = f
        self._red = StreamRedactor(secrets)

    def write(self, s: str) -> int:
        out = self._red.feed(s.encode("utf-8", "surrogateescape"))
        if out:
            self._f.write(out.decode("utf-8", "replace"))
        return len(s)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        rest = self._red.flush()
        if rest:
            self._f.write(rest.decode("utf-8", "replace"))
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def redact_tree(root: Path, secrets: Iterable[str] | None = None) -> list[Path]:
    """Rewrite (atomically) every text file under `root` (logs, JSON, YAML, Markdown) without
    secrets; returns those changed."""
    from finlora.atomic import atomic_open

    secrets = secret_values() if secrets is None else list(secrets)
    changed = []
    root = Path(root)
    if not root.is_dir():
        return changed
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or not p.is_file() or p.suffix not in TEXT_SUFFIXES:
            continue
        if p.name.startswith(".") or p.stat().st_size > MAX_SWEEP_BYTES:
            continue
        try:
            text = p.read_bytes().decode("utf-8", "surrogateescape")
            clean = redact_text(text, secrets, patterns=p.suffix in LOG_SUFFIXES)
            if clean != text:
                with atomic_open(p, "wb", encoding=None) as f:
                    f.write(clean.encode("utf-8", "surrogateescape"))
                changed.append(p)
        except OSError:
            continue
    return changed
