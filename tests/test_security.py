"""No token in the tree or in any log a run writes; no remote code; safetensors only."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yml") if p.stem != "matrix")  # matrix.yml generates them

# a password key followed by a literal value; not `password: str` (code) nor an empty / templated
# value. Scanned for, not redacted: logs quote config keys, and the values are redacted by name.
PASSWORD_VALUE = re.compile(
    r"""(?i)\bpass(?:word|wd)["']?\s*[:=]\s*["']?(?!str\b|None\b|null\b|\$|\{|<|\*)[^\s"',;)}]{4,}""")


def find_secrets(text: str, secrets=()) -> list[tuple[int, str]]:
    """(line number, kind) of every credential-looking string (finlora.redact's token formats, a
    password with a value) and every given secret."""
    from finlora.redact import PATTERNS

    hits = []
    for i, line in enumerate(text.splitlines(), start=1):
        for name, pat in {**PATTERNS, "password with a value": PASSWORD_VALUE}.items():
            if pat.search(line):
                hits.append((i, name))
        hits += [(i, "secret value from the environment") for s in secrets if s and s in line]
    return hits


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split("\0") if f]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (PNG, safetensors, pickles): scanned as bytes below when needed
    return data.decode("utf-8", "replace")


def test_tracked_tree_has_no_secrets():
    hits = []
    for p in tracked_files():
        if p.is_file() and (text := text_of(p)) is not None:
            hits += [f"{p.relative_to(ROOT)}:{line}: {kind}" for line, kind in find_secrets(text)]
    assert not hits, "credential-looking strings in tracked files:\n" + "\n".join(hits)


def test_scanner_finds_what_it_should():
    samples = ["hf_" + "a1B2" * 9, "sk-" + "x" * 40, "AKIA" + "ABCDEFGHIJKLMNOP",
               "-----BEGIN " + "RSA PRIVATE KEY-----", "pass" + "word: hunter22", '"pass' + 'word": "s3cr3t!"']
    for s in samples:
        assert find_secrets(f"x = 1\n{s}\n"), s
    for s in ["password: str", "password: ${DB_PASSWORD}", "hf_short", "tokenizer_config: x"]:
        assert not find_secrets(s), s


def test_stream_redactor_splits_chunks_and_keeps_progress_bars():
    from finlora.redact import REDACTED, StreamRedactor

    secret = "hf_" + "Q" * 36
    text = f"loading {secret}\r 10%|#  |\r 20%|## |\rtoken={secret}\n".encode()
    for size in (1, 2, 3, 7, 64, len(text)):
        red = StreamRedactor([secret])
        out = b"".join(red.feed(text[i:i + size]) for i in range(0, len(text), size)) + red.flush()
        assert secret.encode() not in out, size
        assert out == text.replace(secret.encode(), REDACTED.encode()), size
    # progress updates are not held back waiting for a newline
    red = StreamRedactor([secret])
    assert red.feed(b"\r 30%|###|") == b"\r 30%|###|"


def test_secret_values_only_from_secret_names():
    from finlora.redact import secret_values

    env = {"HF_TOKEN": "hf_" + "z" * 34, "AWS_SECRET_ACCESS_KEY": "abc/def+ghi123", "DB_PASSWORD": "pw-123456",
           "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1", "SOME_KEY": "1", "PATH": "/usr/bin"}
    assert set(secret_values(env)) == {env["HF_TOKEN"], env["AWS_SECRET_ACCESS_KEY"], env["DB_PASSWORD"]}


def test_the_env_file_axolotl_loads_is_redacted_too(tmp_path):
    """Axolotl's CLI loads a `.env` found above its own folder into the child only: the parent's
    filter (launch.run_axolotl) takes its secrets from the same search (python-dotenv's, upward)."""
    from finlora.launch import axolotl_dotenv
    from finlora.redact import StreamRedactor, secret_values

    (tmp_path / ".env").write_text("HF_TOKEN=hf_" + "q" * 34 + "\nEMPTY_KEY=\n")
    (tmp_path / "site" / "axolotl" / "cli").mkdir(parents=True)
    found = axolotl_dotenv(tmp_path / "site" / "axolotl" / "cli")
    assert found == {"HF_TOKEN": "hf_" + "q" * 34}
    red = StreamRedactor(secret_values({**found, "PATH": "/usr/bin"}))
    assert red.feed(b"token hf_" + b"q" * 34 + b"\n") + red.flush() == b"token [REDACTED]\n"


@pytest.fixture(scope="session")
def reference_run(base_model_dir, tmp_path_factory):
    from test_reliability import reference_run_once

    return reference_run_once(tmp_path_factory)


@pytest.mark.slow
def test_training_with_secrets_in_env_leaks_none(reference_run):
    """HF_TOKEN, an API key and a password are set in the environment of a real tiny
    run, and the token is also a recipe value Axolotl prints in its config dump: none
    of the values appears in stdout, stderr or any file under the output folder."""
    secrets = reference_run["secrets"]
    out = reference_run["out"]
    stdout, stderr = reference_run["stdout"], reference_run["stderr"]
    streams = {"stdout": stdout, "stderr": stderr}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "debug.log").is_file() and (out / "adapter_model.safetensors").is_file()
    leaks = []
    for name, value in secrets.items():
        v = value.encode()
        leaks += [f"{name} in {s}" for s, data in streams.items() if v in data]
        leaks += [f"{name} in {p.relative_to(out)}" for p in files if v in p.read_bytes()]
    assert not leaks, leaks
    # the token was really printed, and redacted on the way: by the pipe and in the debug log
    assert b"[REDACTED]" in stdout + stderr
    assert "[REDACTED]" in (out / "debug.log").read_text(errors="replace")
    # progress bars still stream through the filter
    assert b"\r" in stderr


@pytest.mark.slow
def test_tiny_run_logs_have_no_token_patterns(tiny_run):
    from finlora.redact import secret_values

    out = tiny_run["out"]
    # every log and JSON the run wrote; not the tokenizer copy, whose vocabulary has
    # entries such as a quoted pass-word key mapped to a token id
    logs = [out.parent / "train.log"] + [p for p in out.rglob("*") if p.suffix in (".log", ".jsonl", ".json", ".md")
                                         and not p.name.startswith("tokenizer")]
    hits = []
    for p in logs:
        if p.is_file() and (text := text_of(p)) is not None:
            hits += [f"{p.name}:{line}: {kind}" for line, kind in find_secrets(text, secret_values())]
    assert not hits, hits


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_no_remote_code_and_safetensors(recipe):
    cfg = yaml.safe_load(recipe.read_text())
    assert cfg.get("trust_remote_code") is False, \
        f"{recipe.name}: trust_remote_code must be false (remote code runs with your credentials)"
    assert cfg.get("save_safetensors") is True, f"{recipe.name}: save_safetensors must be true (no pickles)"


def test_adapter_loader_refuses_pickled_bin(tmp_path):
    from finlora import models

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"a pickle would run code when loaded")
    with pytest.raises(models.ModelError, match="only safetensors adapters are loaded"):
        models.check_adapter(tmp_path, "./outputs/base/SmolLM2-135M-Instruct")
