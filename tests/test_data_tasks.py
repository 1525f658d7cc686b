"""`make data` for every recipe task (FinLoRA's files from SRC, the cache or a download, each
checked by its hash) and the shipped offline default. ../shared/data is used where present
(conftest.SHARED, which FINLORA_SHARED_DATA=none hides)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from finlora import ROOT, cli
from finlora.data import defaults, recipe_data
from finlora.data.convert import input_text
from finlora.data.prepare import main
from finlora.data.tasks import RECIPE_TASKS, TASKS
from finlora.errors import DataError
from finlora.recipes import Recipe

from conftest import SHARED, needs_shared
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yml") if p.stem != "matrix")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(recipe_data.ENV_SRC, raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    """`make data ARGS=...`: main through the command-line layer, as scripts/prepare_data.py runs it."""
    rc = cli.run(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonl(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


# --- the shipped default ----------------------------------------------------------------------

DEFAULT_FILES = ["train/sentiment_cpu_train.jsonl", "test/fpb_heldout_test.jsonl", "test/fiqa_test.jsonl",
                 "test/tfns_test.jsonl", "test/nwgi_heldout_test.jsonl"]


def test_shipped_files_are_documented_small_tracked_and_finloras():
    from finlora.data.tasks import TEST_SETS

    readme = (ROOT / "data/README.md").read_text()
    for rel in defaults.SHIPPED_FILES:
        p = defaults.SHIPPED / rel
        assert p.is_file() and p.stat().st_size < 2 << 20, rel
        assert Path(rel).name in readme, f"{rel} not in data/README.md"
    assert "CC BY-NC-SA 3.0" in readme
    for name in ("fiqa", "tfns", "nwgi"):  # FinLoRA's test files, byte for byte
        assert sha(defaults.SHIPPED / "finlora" / TEST_SETS[name].source.path) == TEST_SETS[name].source.sha256


def test_offline_default_trains_on_the_shipped_real_data(tmp_path, capsys):
    rc, out, _ = run(capsys, "--out-dir", tmp_path / "d")
    assert rc == 0 and "data/sources" in out and "SYNTHETIC" not in out
    train = tmp_path / "d/train/sentiment_cpu_train.jsonl"
    assert train.is_file() and not train.is_symlink()
    st = json.loads((tmp_path / "d/stats/sentiment_cpu_train.json").read_text())
    assert st["synthetic"] is False and st["task"] == "fpb + nwgi as sentiment"
    assert "data/sources/raw/financial_phrasebank_train.csv" in st["source"]
    for rel in DEFAULT_FILES:
        assert (tmp_path / "d" / rel).is_file()
    # FinLoRA's FiQA and TFNS test files as published (the strict scorer repairs TFNS), licence beside
    for name in ("fiqa", "tfns"):
        assert sha(tmp_path / f"d/test/{name}_test.jsonl") == sha(defaults.SHIPPED / f"finlora/test/{name}_test.jsonl")
        src = json.loads((tmp_path / f"d/test/{name}_test.source.json").read_text())
        assert src["licence"] == "MIT" and src["as_published"] and src["sha256"] == sha(tmp_path / f"d/test/{name}_test.jsonl")
    # the same seed writes the same bytes
    rc, _, _ = run(capsys, "--out-dir", tmp_path / "e")
    assert all((tmp_path / "d" / r).read_bytes() == (tmp_path / "e" / r).read_bytes() for r in DEFAULT_FILES)


def test_the_cpu_default_is_never_scored_on_rows_it_trains_on(tmp_path, capsys):
    assert run(capsys, "--out-dir", tmp_path / "d")[0] == 0
    trained = {input_text(r["context"]) for r in rows(tmp_path / "d/train/sentiment_cpu_train.jsonl")}
    for name in ("fpb_heldout", "fiqa", "tfns", "nwgi_heldout"):
        from finlora.data.tasks import TEST_SETS

        scored = {input_text(r["context"]) for r in rows(tmp_path / "d/test" / TEST_SETS[name].file)}
        assert not trained & scored, name
    # FinLoRA's own NWGI test file holds NWGI rows the default trains on: not one of its sets
    nwgi = {input_text(r["context"]) for r in rows(defaults.SHIPPED / "finlora/test/nwgi_test.jsonl")}
    assert len(trained & nwgi) == defaults.NWGI_TRAIN_ROWS


@needs_shared
def test_offline_default_is_byte_identical_to_src_shared(tmp_path, capsys):
    """The shipped files are the same bytes as ../shared/data's, so the offline default writes the
    same train and test files as `make data SRC=../shared/data`."""
    for rel in defaults.SHIPPED_FILES:
        assert sha(defaults.SHIPPED / rel) == sha(SHARED / rel), rel
    defaults.prepare_default(None, out_dir=tmp_path / "shipped")
    defaults.prepare_default(SHARED, out_dir=tmp_path / "src")
    capsys.readouterr()
    for rel in DEFAULT_FILES:
        assert sha(tmp_path / "shipped" / rel) == sha(tmp_path / "src" / rel), rel


def test_synthetic_only_when_asked(tmp_path, capsys):
    rc, out, _ = run(capsys, "--synthetic", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0 and "SYNTHETIC DATA (asked for)" in out
    assert (tmp_path / "d/train/sentiment_cpu_train.jsonl").is_symlink()
    with pytest.raises(SystemExit) as e:  # argparse's usage error: exit status 2
        main(["--synthetic", "--task", "formula", "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "--synthetic is the CPU default's smoke-test set" in capsys.readouterr().err


def test_missing_shipped_files_are_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "SHIPPED", tmp_path / "nowhere")
    with pytest.raises(DataError, match="data shipped with the repository is missing"):
        defaults.prepare_default(None, out_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_missing_src_folder_says_so(tmp_path, capsys):
    rc, _, err = run(capsys, "--src", tmp_path / "nope", "--out-dir", tmp_path / "d")
    assert rc == 1 and err.strip() == f"error: --src: {tmp_path / 'nope'} does not exist (or is not a folder)"


# --- recipes and tasks ----------------------------------------------------------------------

def test_every_recipe_maps_to_its_task():
    assert len([r for r in RECIPES if r != "smollm2_sentiment_r8"]) == 48
    for r in RECIPES:
        task = recipe_data.task_of_recipe(Recipe.open(r))
        if r == "smollm2_sentiment_r8":
            assert task == "sentiment_cpu"
        else:
            assert r.startswith(task + "_") and task in RECIPE_TASKS, r


def test_every_recipe_task_has_finloras_train_file_and_test_sets():
    for name, rt in RECIPE_TASKS.items():
        assert rt.train_task in TASKS and rt.test_sets, name
        if name != "sentiment_cpu":
            assert rt.train is not None and rt.train.url.startswith("https://")


def _finlora_rows(task: str, split: str, n: int = 6) -> list[dict]:
    """Small FinLoRA-format rows with the task's kind of answer."""
    t = TASKS[task]
    out = []
    for i in range(n):
        text = f"{task} {split} example number {i} about company {i * 7}"
        if t.answer_type == "label":
            target = t.labels[i % len(t.labels)]
            ctx = (t.render({"text": text, "instruction": "Pick one."}) if "instruction" in t.fields
                   else t.render({"text": text}))
        else:
            target = f"{i}.50" if t.answer_type == "number" else f"answer {i}"
            ctx = f"Question about {text}. Answer:"
        out.append({"context": ctx, "target": target})
    return out


def _registered(monkeypatch, tmp: Path, task: str) -> Path:
    """A SRC folder laid out as FinLoRA's data/ with small files of `task`, and the registry's
    entries for them recording their hashes (as it records FinLoRA's own)."""
    from finlora.data import tasks

    src, rt = tmp / "src", RECIPE_TASKS[task]
    made = {}
    for f, kind in [(rt.train, rt.train_task)] + [(s.source, s.task) for s in rt.test_sets if s.source]:
        path = jsonl(src / f.path, _finlora_rows(kind, f.path.split("/")[0]))
        made[f.path] = replace(f, sha256=sha(path), rows=6, lfs=False)
    monkeypatch.setitem(tasks.RECIPE_TASKS, task, replace(rt, train=made[rt.train.path]))
    for s in rt.test_sets:
        if s.source:
            monkeypatch.setitem(tasks.TEST_SETS, s.name, replace(s, source=made[s.source.path]))
    return src


@pytest.mark.parametrize("task", sorted(t for t in RECIPE_TASKS if t != "sentiment_cpu"))
def test_task_from_src_writes_the_recipe_file_and_finloras_test_sets(tmp_path, capsys, monkeypatch, task):
    from finlora.data import tasks

    src = _registered(monkeypatch, tmp_path, task)
    rc, out, err = run(capsys, "--task", task, "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    sets = tasks.RECIPE_TASKS[task].test_sets
    written = sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*.jsonl"))
    assert written == sorted([f"train/{task}_train.jsonl"] + [f"test/{s.file}" for s in sets])
    for s in sets:  # as published, byte for byte, with source, hash and licence beside
        assert sha(tmp_path / "d/test" / s.file) == s.source.sha256
        meta = json.loads((tmp_path / "d/test" / s.file.replace(".jsonl", ".source.json")).read_text())
        assert meta["licence"] == s.licence and meta["commit"] == s.source.commit and meta["rows"] == 6
    assert f"./data/train/{task}_train.jsonl" in (ROOT / f"recipes/{task}_r8.yml").read_text()
    first = {w: (tmp_path / "d" / w).read_bytes() for w in written}
    rc, _, _ = run(capsys, "--recipe", f"{task}_r8", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0 and {w: (tmp_path / "d" / w).read_bytes() for w in written} == first


def test_a_file_that_is_not_finloras_is_refused_by_its_hash(tmp_path, capsys, monkeypatch):
    src = _registered(monkeypatch, tmp_path, "formula")
    p = src / "test/formula_test.jsonl"
    p.write_text(p.read_text().replace("0.50", "0.51"))
    rc, _, err = run(capsys, "--task", "formula", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{p}: sha256 " in err and "another version of the file" in err
    assert not (tmp_path / "d").exists()


def test_git_blob_id_checks_a_file_without_a_recorded_sha256(tmp_path):
    """FinLoRA's repository names every file's content by its git blob id (the SHA-1 of
    b"blob <size>\\0" + content): `git hash-object` of the file, worked out here by hand."""
    import hashlib

    from finlora.data.tasks import FinLoRAFile

    body = b'{"context": "x", "target": "y"}\n'
    path = tmp_path / "f.jsonl"
    path.write_bytes(body)
    blob = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
    assert recipe_data.verified(FinLoRAFile("test/f.jsonl", "c", blob), path) == path
    with pytest.raises(DataError, match="git blob id"):
        recipe_data.verified(FinLoRAFile("test/f.jsonl", "c", "0" * 40), path)


def test_download_from_a_pinned_commit_is_checked_and_cached(tmp_path, capsys, monkeypatch):
    """The download path end to end over real HTTP (a server on this machine standing in for
    FinLoRA's file host): fetched once, checked, cached, read from the cache after that."""
    import functools
    import http.server
    import threading

    from finlora.data import tasks

    src = _registered(monkeypatch, tmp_path, "xbrl_term")
    rt = tasks.RECIPE_TASKS["xbrl_term"]
    served = tmp_path / "served"
    for f in [rt.train] + [s.source for s in rt.test_sets]:
        jsonl(served / tasks.FINLORA_REPO / f.commit / "data" / f.path, rows(src / f.path))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(tasks, "FINLORA_RAW", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(recipe_data, "CACHE", tmp_path / "cache")
    try:
        rc, out, err = run(capsys, "--task", "xbrl_term", "--out-dir", tmp_path / "d", "--no-token-check")
        assert rc == 0, err
        assert out.count("data: downloading http://127.0.0.1") == 2
        assert (tmp_path / "cache" / rt.train.commit / rt.train.path).is_file()
        rc, out, _ = run(capsys, "--task", "xbrl_term", "--out-dir", tmp_path / "e", "--no-token-check")
        assert rc == 0 and "downloading" not in out  # from the cache
    finally:
        server.shutdown()


def test_missing_source_names_each_file_its_url_and_where_to_put_it(tmp_path, capsys, monkeypatch):
    from finlora.data import tasks

    monkeypatch.setattr(tasks, "FINLORA_RAW", "https://127.0.0.1:9")  # nothing answers there
    monkeypatch.setattr(recipe_data, "CACHE", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "--task", "headline", "--src", tmp_path / "empty", "--out-dir", tmp_path / "d")
    assert rc == 1 and "nothing was written" in err
    f = RECIPE_TASKS["headline"].train
    assert f"  train/headline_train.jsonl: https://127.0.0.1:9/Open-Finance-Lab/FinLoRA/{f.commit}/data/" in err
    assert "test/headline_test.jsonl:" in err and "SRC=dir" in err
    assert not (tmp_path / "d").exists()


def test_bad_row_in_a_src_file_is_reported_by_line(tmp_path, capsys, monkeypatch):
    from finlora.data import tasks

    src = _registered(monkeypatch, tmp_path, "formula")
    p = src / "train/formula_train.jsonl"
    p.write_text(p.read_text() + '{"context": "Q. Answer:", "target": "about five"}\n')
    rt = tasks.RECIPE_TASKS["formula"]
    monkeypatch.setitem(tasks.RECIPE_TASKS, "formula", replace(rt, train=replace(rt.train, sha256=sha(p))))
    rc, _, err = run(capsys, "--task", "formula", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{p}:7: target 'about five' is not a number" in err
    assert not (tmp_path / "d").exists()  # nor FinLoRA's test file: nothing is written before every check


def test_published_overlap_is_left_out_and_listed(tmp_path, capsys, monkeypatch):
    from finlora.data import tasks

    src = _registered(monkeypatch, tmp_path, "xbrl_term")
    test_row = rows(src / "test/xbrl_term_test.jsonl")[0]
    p = src / "train/xbrl_term_train.jsonl"
    p.write_text(p.read_text() + json.dumps(test_row) + "\n")
    rt = tasks.RECIPE_TASKS["xbrl_term"]
    monkeypatch.setitem(tasks.RECIPE_TASKS, "xbrl_term", replace(rt, train=replace(rt.train, sha256=sha(p))))
    rc, out, err = run(capsys, "--task", "xbrl_term", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert "1 train row(s) left out" in out and f"{p}:7 (train)" in out
    assert test_row not in rows(tmp_path / "d/train/xbrl_term_train.jsonl")
    st = json.loads((tmp_path / "d/stats/xbrl_term_train.json").read_text())
    assert st["train_test_overlap_left_out"] == [f"{p}:7"]


@needs_shared
@pytest.mark.parametrize("recipe,rows_train,rows_test", [("formula_r8", 800, 200), ("xbrl_term_r4", 5845, 651),
                                                        ("financebench_r8_dora", 86, 43)])
def test_recipes_from_shared_data(tmp_path, capsys, recipe, rows_train, rows_test):
    task = recipe_data.task_of_recipe(Recipe.open(recipe))
    rc, _, err = run(capsys, "--recipe", recipe, "--src", SHARED, "--out-dir", tmp_path / "d")
    assert rc == 0, err
    assert len(rows(tmp_path / f"d/train/{task}_train.jsonl")) == rows_train
    (s,) = RECIPE_TASKS[task].test_sets
    assert len(rows(tmp_path / "d/test" / s.file)) == rows_test == s.source.rows  # as published


@needs_shared
@pytest.mark.parametrize("recipe", ["ner_r8", "sentiment_r8", "headline_r8", "finer_r8", "xbrl_extract_r8"])
def test_recipes_shared_data_lacks_say_what_is_missing(tmp_path, capsys, monkeypatch, recipe):
    from finlora.data import tasks

    monkeypatch.setattr(tasks, "FINLORA_RAW", "https://127.0.0.1:9")
    monkeypatch.setattr(recipe_data, "CACHE", tmp_path / "cache")
    task = recipe_data.task_of_recipe(Recipe.open(recipe))
    rc, _, err = run(capsys, "--recipe", recipe, "--src", SHARED, "--out-dir", tmp_path / "d")
    assert rc == 1 and f"  {RECIPE_TASKS[task].train.path}: https://" in err
    if task == "ner":  # the test file is there: only the train file is missing
        assert "test/ner_test.jsonl" not in err
    assert not (tmp_path / "d").exists()


def test_recipe_test_files_warn_about_an_existing_train_file(tmp_path, capsys, monkeypatch):
    """FinLoRA's NWGI test file holds the NWGI rows the CPU default trains on: writing it beside
    that train file says so."""
    from finlora.data import tasks

    out = tmp_path / "d"
    defaults.prepare_default(None, out_dir=out)
    src = _registered(monkeypatch, tmp_path, "sentiment")
    (src / "test/nwgi_test.jsonl").write_bytes((defaults.SHIPPED / "finlora/test/nwgi_test.jsonl").read_bytes())
    nwgi = tasks.TEST_SETS["nwgi"]
    monkeypatch.setitem(tasks.TEST_SETS, "nwgi", replace(nwgi, source=replace(nwgi.source,
                                                                              sha256=sha(src / "test/nwgi_test.jsonl"))))
    capsys.readouterr()
    rc, out_text, err = run(capsys, "--task", "sentiment", "--src", src, "--out-dir", out, "--no-token-check")
    assert rc == 0, err
    assert f"warning: {defaults.NWGI_TRAIN_ROWS} row(s) of the existing" in out_text
    assert "sentiment_cpu_train.jsonl are in the test file(s) written now" in out_text


def test_train_names_the_make_data_command_for_a_recipe_without_data(tmp_path):
    from finlora.errors import RecipeError
    from finlora.recipes import Recipe
    from finlora.train import ensure_inputs

    recipe = Recipe.open("ner_r8", ["--datasets", '[{"path": "%s"}]' % (tmp_path / "data/train/ner_train.jsonl")])
    with pytest.raises(RecipeError, match=r"run `make data RECIPE=ner_r8`"):
        ensure_inputs(recipe)


def test_make_data_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    """A file of the user's where `make data` would write: refused, nothing written, the file intact;
    a file `make data` wrote (its stats beside it) is replaced as before."""
    out = tmp_path / "d"
    mine = out / "test" / "fpb_heldout_test.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own rows\n")
    rc, _, err = run(capsys, "--out-dir", out)
    assert rc == 1 and f"{mine} exists and `make data` did not write it" in err
    assert mine.read_text() == "my own rows\n" and list((out / "test").iterdir()) == [mine]
    assert not (out / "train").exists()
    mine.unlink()
    assert run(capsys, "--out-dir", out)[0] == 0
    assert run(capsys, "--out-dir", out)[0] == 0  # its own files: replaced
