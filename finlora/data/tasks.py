"""The registry: tasks (prompt template, label set, answer type, public source), FinLoRA's files
(commit, hashes), the test sets and the recipe tasks.

Every prepared example is FinLoRA's `{"context", "target"}` pair: the task's template with the
input filled in. Templates are plain strings with `{name}` placeholders (only `Task.fields` are
substituted, so literal braces such as `{negative/neutral/positive}` need no escaping). `{text}`
is always the main input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from finlora.errors import DataError

SENTIMENT3 = ("negative", "neutral", "positive")
NWGI7 = (
    "strong negative", "moderately negative", "mildly negative", "neutral",
    "mildly positive", "moderately positive", "strong positive",
)


def _sentiment(kind: str, labels: tuple[str, ...]) -> str:
    return (f"Instruction: What is the sentiment of this {kind}? Please choose an answer from "
            "{" + "/".join(labels) + "}.\nInput: {text}\nAnswer: ")


SENTIMENT_NEWS = _sentiment("news", SENTIMENT3)
SENTIMENT_TWEET = _sentiment("tweet", SENTIMENT3)
NWGI_TEMPLATE = _sentiment("news", NWGI7)
# The hub's own parquet conversion of takala/financial_phrasebank's sentences_50agree config (ref
# refs/convert/parquet, "Update parquet files" 6082a20) has the loading script's 4,846 rows in its order.
FPB_PARQUET = ("hf://datasets/takala/financial_phrasebank@refs%2Fconvert%2Fparquet/"
               "sentences_50agree/train/0000.parquet")

# FinGPT's sentiment training mix answers in three classes and in NWGI's seven levels.
SENTIMENT_MIX = SENTIMENT3 + tuple(x for x in NWGI7 if x != "neutral")

# FinGPT's instruction datasets (headline, NER) carry the instruction per row.
INSTRUCTION_TEMPLATE = "Instruction: {instruction}\nInput: {text}\nAnswer: "


@dataclass
class Mapping:
    """How a source's columns fill the task's template and answer."""

    text_col: str | None = "text"
    label_col: str | None = "label"
    score_col: str | None = None           # continuous score -> label (FiQA thresholds)
    kind_col: str | None = None            # column choosing a template variant (FiQA: type)
    fields: dict[str, str] = field(default_factory=dict)  # placeholder -> column
    label_map: dict[str, str] | None = None  # raw label/id -> task label (LABEL_MAPS)
    swap: tuple[str, str] | None = None    # repair: swap these two labels
    finlora: bool = False                  # rows already are {"context", "target"}

    @classmethod
    def of_format(cls, fmt: str) -> "Mapping":
        """The columns of a file format's rows (sources.FORMATS)."""
        return cls(**_FORMAT_COLUMNS.get(fmt, {}))


_FORMAT_COLUMNS = {"all-data-csv": {"text_col": "content"}, "fpb-txt": {"text_col": "sentence"},
                   "fiqa-json": {"text_col": "sentence", "label_col": None, "score_col": "sentiment_score",
                                 "kind_col": "type"},
                   "finlora": {"finlora": True}}


@dataclass(frozen=True)
class HubSource:
    """Where `datasets.load_dataset` finds the original set, and how to read it.

    `name` is a hub repository that `datasets` 4.x loads as is (parquet, CSV or JSON files,
    no loading script), or a packaged builder ("parquet") with `data_files` naming the exact
    file of its train split for a set whose own repository is a loading script, which `datasets`
    4.x refuses ("Dataset scripts are no longer supported"): FPB, from the hub's parquet conversion."""

    name: str
    train_split: str | None = "train"
    test_split: str | None = "test"
    columns: Mapping = field(default_factory=Mapping)  # a copy for each read (`dataclasses.replace`)
    data_files: str | None = None         # the train split's file (URL) for a builder name
    origin: str = ""                      # the set the files come from, for messages and docs

    @property
    def where(self) -> str:
        return self.origin or self.name


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    template: str
    labels: tuple[str, ...] | None        # closed label set, or None for free answers
    answer_type: str                      # "label" | "number" | "text"
    hub: HubSource | None = None
    defaults: dict = field(default_factory=dict)  # default values for placeholders
    variants: dict = field(default_factory=dict)  # kind -> template (FiQA posts read as tweets)

    @property
    def fields(self) -> tuple[str, ...]:
        """The placeholders the template uses, in order."""
        return tuple(dict.fromkeys(re.findall(r"\{(\w+)\}", self.template)))

    def render(self, values: dict[str, str], kind: str | None = None) -> str:
        out = self.variants.get(kind, self.template)
        for name in self.fields:
            out = out.replace("{" + name + "}", values[name])
        return out


# Label ids of the original hub sets, mapped at the source.
LABEL_MAPS: dict[str, dict[str, str]] = {
    # takala/financial_phrasebank: 0 negative, 1 neutral, 2 positive
    "fpb": {"0": "negative", "1": "neutral", "2": "positive"},
    # zeroshot/twitter-financial-news-sentiment: 0 Bearish, 1 Bullish, 2 Neutral
    "tfns": {"0": "negative", "1": "positive", "2": "neutral"},
}

# Named repairs of known labelling errors in published copies: pairs of labels to swap.
FIXES: dict[str, tuple[str, str]] = {
    # FinLoRA's tfns_test.jsonl mapped TFNS ids as 0 negative, 1 neutral, 2 positive,
    # so its `positive` and `neutral` are swapped ("upped to Buy at ..." is `neutral`).
    "tfns-swap": ("positive", "neutral"),
}


def fiqa_label(score: float) -> str:
    """FinGPT's thresholds for FiQA's continuous sentiment score."""
    if score < -0.1:
        return "negative"
    if score < 0.1:
        return "neutral"
    return "positive"


def fold_nwgi(label: str) -> str:
    """NWGI's seven levels to three, as FinLoRA scores them ("mildly positive" -> "positive")."""
    low = label.lower()
    for base in SENTIMENT3:
        if base in low:
            return base
    return label


# FinGPT's instruction sets (headline, NER, the sentiment mix): input, output and the row's instruction
_INSTRUCTION_COLUMNS = Mapping("input", "output", fields={"instruction": "instruction"})

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("sentiment", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label"),  # the CPU default's
    Task("fpb", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
         HubSource("parquet", "train", None, Mapping("sentence", label_map=LABEL_MAPS["fpb"]), FPB_PARQUET,
                   origin="takala/financial_phrasebank (sentences_50agree, the hub's parquet conversion)")),
    Task("fiqa", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
         HubSource("TheFinAI/fiqa-sentiment-classification", "train", "test",
                   Mapping("sentence", None, score_col="score", kind_col="type")),
         variants={"post": SENTIMENT_TWEET, "headline": SENTIMENT_NEWS}),
    Task("tfns", "sentiment", SENTIMENT_TWEET, SENTIMENT3, "label",
         HubSource("zeroshot/twitter-financial-news-sentiment", "train", "validation",
                   Mapping(label_map=LABEL_MAPS["tfns"]))),
    Task("nwgi", "sentiment", NWGI_TEMPLATE, NWGI7, "label",
         HubSource("TheFinAI/NWGI_test", None, "test", Mapping("news"))),
    Task("headline", "headline", INSTRUCTION_TEMPLATE, ("Yes", "No"), "label",
         HubSource("FinGPT/fingpt-headline-cls", "train", "test", _INSTRUCTION_COLUMNS),
         defaults={"instruction": "Does the news headline talk about price going up? "
                                  "Please choose an answer from {Yes/No}."}),
    Task("ner", "ner", INSTRUCTION_TEMPLATE, ("person", "organization", "location"), "label",
         HubSource("FinGPT/fingpt-ner-cls", "train", "test", _INSTRUCTION_COLUMNS)),
    # FinLoRA's FiNER-139 and FNXL prompts (its data/process_finer.py, process_fnxl.py): 4 questions a
    # prompt, comma-separated tags; its XBRL extraction prompts (tags, values, formulas) over filings' XML
    Task("finer", "xbrl", "{text}", None, "text"),
    Task("fnxl", "xbrl", "{text}", None, "text"),
    Task("xbrl_extract", "xbrl", "{text}", None, "text"),
    # XBRL-Agent's terminology and financial math
    Task("xbrl_term", "xbrl", "Explain this XBRL term briefly in one sentence: {text}. Answer:", None, "text"),
    Task("formula", "math",
         "Use formula {formula} to answer the question. Answer with a numerical answer with 2 decimal places "
         "and with no explanations or other text. Formula: {equation}, Explanation: {explanation}. "
         "Question: \"{text}\". Answer:", None, "number"),
    Task("financebench", "qa",
         "Answer the following question very briefly using scanned text from pages. No explanation needed. "
         "Question: {question}\nDocument Pages Context:\n{text}\n\nAnswer:", None, "text"),
    # FinLoRA's sentiment training mix (76.8K rows: FPB, FiQA-SA, TFNS, NWGI, with their instructions)
    Task("fingpt_sentiment", "sentiment", INSTRUCTION_TEMPLATE, SENTIMENT_MIX, "label",
         HubSource("FinGPT/fingpt-sentiment-train", "train", None, _INSTRUCTION_COLUMNS)),
]}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; tasks are: {', '.join(TASKS)}") from None


# --------------------------------------------------------------------------- FinLoRA's files

FINLORA_REPO = "Open-Finance-Lab/FinLoRA"
FINLORA_RAW = "https://raw.githubusercontent.com"          # the files, at a commit
FINLORA_LFS = "https://media.githubusercontent.com/media"  # the Git LFS ones


@dataclass(frozen=True)
class FinLoRAFile:
    """One file of FinLoRA's data/ folder at the commit that last changed it (read at its HEAD
    7e1cf82), with the hashes it is checked against (docs/DATA.md: its git blob id; its sha256
    where it was read here, or where its Git LFS pointer names it)."""

    path: str                      # under data/: "test/fpb_test.jsonl"
    commit: str
    blob: str
    sha256: str | None = None
    rows: int | None = None
    lfs: bool = False

    @property
    def url(self) -> str:
        return f"{FINLORA_LFS if self.lfs else FINLORA_RAW}/{FINLORA_REPO}/{self.commit}/data/{self.path}"


_C0 = "03d71d886c1da8cff495eb97d2521c9fd9a176d0"
_XE = "52ad3db16f72198859e75f06a42161c69b00bdcd"
_TERM = "eb50f2382d11bbecf1efd83a692bb105d1ea6f3f"
FILES: dict[str, FinLoRAFile] = {f.path: f for f in [
    FinLoRAFile("test/fpb_test.jsonl", _C0, "269aaf3b9cc7f08616979fe79ec539614091c278",
                "c9d0ea01a0e999413e72960683561d863018a9b8541068e49f6a57426f2e14d6", 1212),
    FinLoRAFile("test/fiqa_test.jsonl", _C0, "915d21c386867f83508b90e4ec792e9200566748",
                "b93474e5bf55eecd367fc342da9b4501758dcb4a45d64454e24955dc9b2cc56f", 235),
    FinLoRAFile("test/tfns_test.jsonl", _C0, "e07e744ac0604537d97ec2f73cc8fe2307bda877",
                "717ce0089d304242247cd772edf8f17d4a3af64b9b482ef901cbe9a8caee8d3c", 2388),
    FinLoRAFile("test/nwgi_test.jsonl", _C0, "8509e05fa7c9ffaa9abe2e03070b802c5589b8aa",
                "b350a0eb3f908a2576013307653fe4b2bcca00c2d16af85c02c9191b46ec2508", 4047),
    FinLoRAFile("test/headline_test.jsonl", _C0, "585a9d1e0e945f742d327a280d2f12c761e4f9ac"),
    FinLoRAFile("test/ner_test.jsonl", _C0, "e5513ca86c5235bfb2a22a31e301df31b11c16dc",
                "c22d12a7caee57cd1dc001e223b75eda2817fdd8d6ab43a59407191dafb6e6bf", 3502),
    FinLoRAFile("test/finer_test_batched.jsonl", "e5ccc7a3d824c0926bd7a2f7f5098889465ce0ac",
                "da416570e14f0af1c5230a17514eba1e08849874"),
    FinLoRAFile("test/fnxl_test_batched.jsonl", "2cbaa353919c0d01923f6f253e3c2910493218b5",
                "a987761bb4dba8c56eb8327a7666ae8097fcaacd"),
    FinLoRAFile("test/xbrl_extract_tags_test.jsonl", _XE, "6f6ff6151ebc8f005e910a5c77888b636da732b9"),
    FinLoRAFile("test/xbrl_extract_value_test.jsonl", "1387a82a76f647c670859c76e1bd029243a381b1",
                "45bdc33f4eb4fe457c26e45659193682fb1529f8"),
    FinLoRAFile("test/xbrl_extract_formula_test.jsonl", _XE, "48e25613365a712bb84f2fc17ab72f094f0228be"),
    FinLoRAFile("test/xbrl_extract_formula_calculations_test.jsonl", _XE, "411ce51329fffd5d00c99f4cbed237f9ee08afd1"),
    FinLoRAFile("test/xbrl_term_test.jsonl", _TERM, "635972f8d5f0d802cb2b9004e5d30ee3c5838491",
                "1bd89d357bdc3f95e0f21a477930120f2e33449da759093ff67285aeb6e97a90", 651),
    FinLoRAFile("test/formula_test.jsonl", "f5286420c87d8188cc168f4c40cad24701b777ba",
                "f292b2c9739dc7c80c0f3bc882ed0b580f680e7c",
                "48ed981796ec2f8ce9d5dbf36208a814ac32c3cf45b541fb9a82ea2d9655754d", 200),
    FinLoRAFile("test/financebench_test.jsonl", _TERM, "6c619b94034fcf2d8df26b9cfeeed9ffcc4c5908",
                "456333429e874c71799b047697d4c118967b67c5374707fc6aa3e87d7ab07e2b", 43),
    FinLoRAFile("train/finlora_sentiment_train.jsonl", "b28251dbcd317e4e5ad6cae44121059d710c00de",
                "6560ea45309db5f53d6e00ac5da2e5f8db38c60b"),
    FinLoRAFile("train/headline_train.jsonl", _C0, "96f8fa040a27b9c5f8552e942668974d354e175a"),
    FinLoRAFile("train/ner_train.jsonl", _C0, "8c440898d0e9e5af393232e50911fba2a5877a76"),
    FinLoRAFile("train/finer_train_batched.jsonl", "932cb1ea0c7883bda0b1c01c76e6588cd48202ea",
                "0110116d37ddb94f9e7c8059de94f5b71d4ab252"),
    FinLoRAFile("train/xbrl_extract_train.jsonl", "1387a82a76f647c670859c76e1bd029243a381b1",
                "20c8395d4f15780ffef884a0fc64f854631f13df",
                "695f8d9604dd1b8f166bae474d49d607d16eec20461d6421b20087cfa0c094dd", lfs=True),
    FinLoRAFile("train/xbrl_term_train.jsonl", _TERM, "8098cc6096fb7cd9fd7b7be574e168f94540b3bb",
                "8cb2ec6decda902dac42419e04cb95c2607e6a1303524d520a0fce6bf7ffde13", 5856),
    FinLoRAFile("train/formula_train.jsonl", "f5286420c87d8188cc168f4c40cad24701b777ba",
                "6ba08fc3933c66e7cc4b4b563be74b031e284df9",
                "8a8dd3294ff6b12cb32db640ba574c6d6efed65f1f8ca016051a788089c502f7", 800),
    FinLoRAFile("train/financebench_train.jsonl", _TERM, "4993e27d9bb5a3c0aeb79e39afcc2df67d3ff1c5",
                "7d5af91574895a98d35c0d4354ff537d875cd9bc7bc2ec6e8520b37f1ef5d4b0", 86),
]}


# --------------------------------------------------------------------------- the test sets

# FinLoRA's published Llama-3.1-8B-Instruct figures (its README at 635333b): the base and the
# adapters of each variant, (accuracy %, weighted F1), or (None, BERTScore F1) for free text.
# Columns: base, LoRA 8-bit r8 (our r8), QLoRA 4-bit r4 (r4), DoRA (r8_dora), rsLoRA (r8_rslora).
PUBLISHED_COLUMNS = ("base", "r8", "r4", "r8_dora", "r8_rslora")


def _pub(*cells: str) -> dict[str, tuple[float | None, float]]:
    out = {}
    for col, cell in zip(PUBLISHED_COLUMNS, cells):
        acc, f1 = cell.split("/")
        out[col] = (None if acc == "-" else float(acc), float(f1))
    return out


@dataclass(frozen=True)
class TestSet:
    """One test set: what `make data` writes, what `make eval` scores and how, and what
    FinLoRA published for it. The only place that says which sets score which recipe task."""

    name: str                     # DATASETS= name
    recipe_task: str              # the recipe task it scores (RECIPE_TASKS)
    task: str                     # the registry Task of its rows (labels, answer type)
    file: str                     # under data/test/
    max_new_tokens: int           # FinLoRA's budget (test/test_dataset.py max_new_token_dict)
    scorer: str                   # "label" (first label in the answer), "tags" (comma-separated), "text"
    licence: str
    source: FinLoRAFile | None = None   # None: the CPU default's own held-out split
    finlora_name: str = ""        # FinLoRA's --dataset name
    published: dict = field(default_factory=dict)
    fix: str | None = None        # a labelling error the strict block repairs (FIXES)


def _set(name, recipe_task, task, file, budget, scorer, licence, finlora_name=None, published=(), **kw) -> TestSet:
    return TestSet(name, recipe_task, task, file, budget, scorer, licence, FILES.get(f"test/{file}"),
                   finlora_name or name, _pub(*published) if published else {}, **kw)


TEST_SETS: dict[str, TestSet] = {s.name: s for s in [
    _set("fpb", "sentiment", "fpb", "fpb_test.jsonl", 10, "label", "CC BY-NC-SA 3.0 (non-commercial)",
         published=("68.73/0.677", "85.64/0.922", "84.16/0.909", "81.93/0.901", "82.84/0.853")),
    _set("fiqa", "sentiment", "fiqa", "fiqa_test.jsonl", 10, "label", "MIT",
         published=("46.55/0.557", "81.28/0.884", "78.30/0.874", "78.72/0.874", "73.19/0.806")),
    _set("tfns", "sentiment", "tfns", "tfns_test.jsonl", 10, "label", "MIT", fix="tfns-swap",
         published=("69.97/0.683", "88.02/0.932", "83.84/0.910", "59.09/0.702", "59.51/0.655")),
    _set("nwgi", "sentiment", "nwgi", "nwgi_test.jsonl", 10, "label", "MIT",
         published=("43.86/0.583", "54.16/0.690", "49.96/0.645", "19.57/0.281", "35.80/0.464")),
    _set("headline", "headline", "headline", "headline_test.jsonl", 10, "label", "CC BY-SA 3.0",
         published=("45.34/0.558", "84.66/0.852", "88.03/0.886", "64.93/0.781", "71.75/0.828")),
    _set("ner", "ner", "ner", "ner_test.jsonl", 10, "label", "CC BY-SA 3.0",
         published=("48.89/0.569", "98.05/0.981", "96.63/0.966", "71.59/0.834", "95.92/0.963")),
    _set("finer", "finer", "finer", "finer_test_batched.jsonl", 100, "tags", "CC BY-SA 4.0", "xbrl_finer",
         published=("21.28/0.232", "74.10/0.759", "74.32/0.760", "70.92/0.732", "70.72/0.724")),
    # FinLoRA scores FNXL with its FiNER adapters (test/run_all_adapters.sh)
    _set("fnxl", "finer", "fnxl", "fnxl_test_batched.jsonl", 100, "tags", "unstated by FNXL's authors", "xbrl_fnxl",
         published=("3.64/0.045", "23.57/0.250", "23.05/0.253", "33.50/0.311", "35.68/0.348")),
    _set("xbrl_tags", "xbrl_extract", "xbrl_extract", "xbrl_extract_tags_test.jsonl", 20, "label", "MIT",
         "xbrl_tags_extract", ("69.16/0.739", "89.13/0.886", "86.89/0.872", "80.44/0.896", "85.26/0.879")),
    _set("xbrl_value", "xbrl_extract", "xbrl_extract", "xbrl_extract_value_test.jsonl", 20, "label", "MIT",
         "xbrl_value_extract", ("52.46/0.565", "98.49/0.986", "97.14/0.974", "98.57/0.988", "99.13/0.992")),
    _set("xbrl_formula", "xbrl_extract", "xbrl_extract", "xbrl_extract_formula_test.jsonl", 30, "label", "MIT",
         "xbrl_formula_extract", ("12.92/0.201", "77.61/0.876", "89.34/0.898", "88.02/0.882", "89.46/0.893")),
    _set("xbrl_formula_calc", "xbrl_extract", "xbrl_extract", "xbrl_extract_formula_calculations_test.jsonl", 30,
         "label", "MIT", "xbrl_formula_calc_extract",
         ("27.27/0.317", "98.68/0.990", "92.81/0.947", "98.92/0.993", "98.80/0.988")),
    _set("xbrl_term", "xbrl_term", "xbrl_term", "xbrl_term_test.jsonl", 50, "text", "MIT",
         published=("-/0.574", "-/0.599", "-/0.606", "-/0.606", "-/0.630")),
    _set("formula", "formula", "formula", "formula_test.jsonl", 50, "label", "MIT",
         published=("11.00/0.136", "30.00/0.332", "26.50/0.307", "28.50/0.317", "34.50/0.370")),
    _set("financebench", "financebench", "financebench", "financebench_test.jsonl", 50, "text",
         "CC BY-NC 4.0 (non-commercial)", published=("-/0.443", "-/0.511", "-/0.542", "-/0.477", "-/0.575")),
    # The CPU default's own held-out splits (finlora.data.defaults): never trained on, scored
    # as FinLoRA scores FPB and NWGI; FinLoRA's figures are on its own rows, so none are shown.
    _set("fpb_heldout", "sentiment_cpu", "fpb", "fpb_heldout_test.jsonl", 10, "label",
         "CC BY-NC-SA 3.0 (non-commercial)", finlora_name="fpb"),
    _set("nwgi_heldout", "sentiment_cpu", "nwgi", "nwgi_heldout_test.jsonl", 10, "label", "MIT", finlora_name="nwgi"),
]}
# FinLoRA's CFA Level I-III and CPA REG sets are not public: nothing here scores them.


@dataclass(frozen=True)
class RecipeTask:
    """What a recipe task trains on (data/train/<name>_train.jsonl) and is scored on."""

    name: str
    train_task: str               # the registry Task that validates its training rows
    train: FinLoRAFile | None     # FinLoRA's training file (None: the CPU default's own build)
    extra_sets: tuple[str, ...] = ()  # sets of another recipe task it is scored on too

    @property
    def test_sets(self) -> list[TestSet]:
        return [s for s in TEST_SETS.values() if s.recipe_task == self.name or s.name in self.extra_sets]


RECIPE_TASKS: dict[str, RecipeTask] = {t.name: t for t in [
    RecipeTask("sentiment", "fingpt_sentiment", FILES["train/finlora_sentiment_train.jsonl"]),
    RecipeTask("headline", "headline", FILES["train/headline_train.jsonl"]),
    RecipeTask("ner", "ner", FILES["train/ner_train.jsonl"]),
    RecipeTask("finer", "finer", FILES["train/finer_train_batched.jsonl"]),
    RecipeTask("xbrl_extract", "xbrl_extract", FILES["train/xbrl_extract_train.jsonl"]),
    RecipeTask("xbrl_term", "xbrl_term", FILES["train/xbrl_term_train.jsonl"]),
    RecipeTask("formula", "formula", FILES["train/formula_train.jsonl"]),
    RecipeTask("financebench", "financebench", FILES["train/financebench_train.jsonl"]),
    # the CPU default (recipes/smollm2_sentiment_r8.yml): its held-out splits and FinLoRA's FiQA and TFNS
    RecipeTask("sentiment_cpu", "sentiment", None, ("fiqa", "tfns")),
]}


def test_set(name: str) -> TestSet:
    try:
        return TEST_SETS[name]
    except KeyError:
        raise DataError(f"unknown test set {name!r}; sets are: {', '.join(TEST_SETS)}") from None
