"""The FinLoRA task registry: prompt template, label set, answer type and public source.

Every prepared example is FinLoRA's `{"context", "target"}` pair. The context is the
task's template with the input filled in; for the classification tasks it ends in
"Answer: " and the target is one of the task's labels.

Templates are plain strings with `{name}` placeholders (only the names in
`Task.fields` are substituted, so literal braces such as
`{negative/neutral/positive}` need no escaping). `{text}` is always the main input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finlora.errors import DataError

SENTIMENT3 = ("negative", "neutral", "positive")
NWGI7 = (
    "strong negative", "moderately negative", "mildly negative", "neutral",
    "mildly positive", "moderately positive", "strong positive",
)

_SENT = "What is the sentiment of this {kind}? Please choose an answer from {{negative/neutral/positive}}."
SENTIMENT_NEWS = "Instruction: " + _SENT.format(kind="news") + "\nInput: {text}\nAnswer: "
SENTIMENT_TWEET = "Instruction: " + _SENT.format(kind="tweet") + "\nInput: {text}\nAnswer: "
NWGI_TEMPLATE = (
    "Instruction: What is the sentiment of this news? Please choose an answer from "
    "{strong negative/moderately negative/mildly negative/neutral/mildly positive/moderately positive/strong positive}."
    "\nInput: {text}\nAnswer: "
)
# takala/financial_phrasebank is a loading script; the hub's own parquet conversion of its
# sentences_50agree config (ref refs/convert/parquet, "Update parquet files" 6082a20) has the
# same 4,846 rows in the script's order, label ids 0 negative, 1 neutral, 2 positive.
FPB_PARQUET = ("hf://datasets/takala/financial_phrasebank@refs%2Fconvert%2Fparquet/"
               "sentences_50agree/train/0000.parquet")
# nlpaueb/finer-139 is a loading script too; its parquet conversion (config finer-139, the
# train split in several shards). Not checked from here (no network): the converter is.
FINER_PARQUET = "hf://datasets/nlpaueb/finer-139@refs%2Fconvert%2Fparquet/finer-139/{split}/*.parquet"
# FinLoRA's own JSONL files (Open-Finance-Lab/FinLoRA, formerly wangd12rpi/FinLoRA), pinned
# to the commit that last changed each; xbrl_extract_train.jsonl is stored with Git LFS.
FINLORA_RAW = "https://raw.githubusercontent.com/Open-Finance-Lab/FinLoRA/{commit}/data/{path}"
FINLORA_LFS = "https://media.githubusercontent.com/media/Open-Finance-Lab/FinLoRA/{commit}/data/{path}"

# FinGPT's sentiment training mix answers in three classes and in NWGI's seven levels.
SENTIMENT_MIX = SENTIMENT3 + tuple(x for x in NWGI7 if x != "neutral")

# FinGPT's instruction datasets (headline, NER) carry the instruction per row.
INSTRUCTION_TEMPLATE = "Instruction: {instruction}\nInput: {text}\nAnswer: "


@dataclass(frozen=True)
class HubSource:
    """Where `datasets.load_dataset` finds the original set, and how to read it.

    `name` is a hub repository that `datasets` 4.x loads as is (parquet, CSV or JSON files,
    no loading script), or a packaged builder ("parquet", "json") with `data_files`
    naming the exact files (split -> URL, pinned to a commit or the hub's parquet
    conversion) for sets whose own repository is a loading script, which `datasets`
    4.x refuses ("Dataset scripts are no longer supported")."""

    name: str
    config: str | None = None
    train_split: str | None = "train"
    test_split: str | None = "test"
    text_col: str = "text"
    label_col: str | None = "label"
    score_col: str | None = None          # FiQA: continuous score -> label by thresholds
    label_map: str | None = None          # key into LABEL_MAPS (ids -> names)
    fields: tuple[tuple[str, str], ...] = ()  # extra template placeholders: (placeholder, column)
    kind_col: str | None = None           # column choosing a template variant (FiQA: type)
    licence: str = ""
    data_files: tuple[tuple[str, str], ...] = ()  # (split, URL) for a builder name
    revision: str | None = None           # a commit of `name`, where one is pinned
    origin: str = ""                      # the set the files come from, for messages and docs
    finlora_rows: bool = False            # rows already are FinLoRA's {"context", "target"}

    @property
    def where(self) -> str:
        return self.origin or self.name + (f"/{self.config}" if self.config else "")


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    template: str
    labels: tuple[str, ...] | None        # closed label set, or None for free answers
    answer_type: str                      # "label" | "number" | "text"
    hub: HubSource | None = None
    fields: tuple[str, ...] = ("text",)   # placeholders the template uses
    defaults: dict = field(default_factory=dict)  # default values for placeholders
    variants: dict = field(default_factory=dict)  # kind -> template (FiQA posts read as tweets)
    notes: str = ""

    def render(self, values: dict[str, str], kind: str | None = None) -> str:
        out = self.variants.get(kind, self.template) if kind is not None else self.template
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


# Hub sources named by repository (FiQA-SA, TFNS, NWGI, FinGPT's headline, NER and sentiment
# sets) are parquet or CSV repositories, no loading script, so `datasets` 4.x loads them as
# is; the script-based FPB and FiNER are read from the hub's parquet conversion, FinLoRA's
# own files from its repository at a pinned commit.
def _task(*args, **kw) -> Task:
    return Task(*args, **kw)


TASKS: dict[str, Task] = {t.name: t for t in [
    _task("sentiment", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
          notes="generic 3-class financial sentiment (news template); the CPU default"),
    _task("fpb", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
          HubSource("parquet", None, "train", None, text_col="sentence", label_map="fpb",
                    licence="CC BY-NC-SA 3.0", data_files=(("train", FPB_PARQUET),),
                    origin="takala/financial_phrasebank (sentences_50agree, the hub's parquet conversion)"),
          notes="Financial PhraseBank; no test split on the hub: make one (--test-fraction)"),
    _task("fiqa", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
          HubSource("TheFinAI/fiqa-sentiment-classification", None, "train", "test",
                    text_col="sentence", label_col=None, score_col="score", kind_col="type",
                    licence="MIT"),
          variants={"post": SENTIMENT_TWEET, "headline": SENTIMENT_NEWS},
          notes="score < -0.1 negative, < 0.1 neutral, else positive; posts use the tweet wording"),
    _task("tfns", "sentiment", SENTIMENT_TWEET, SENTIMENT3, "label",
          HubSource("zeroshot/twitter-financial-news-sentiment", None, "train", "validation",
                    text_col="text", label_map="tfns", licence="MIT"),
          notes="ids 0 Bearish, 1 Bullish, 2 Neutral; FinLoRA's tfns_test.jsonl needs --fix tfns-swap"),
    _task("nwgi", "sentiment", NWGI_TEMPLATE, NWGI7, "label",
          HubSource("TheFinAI/NWGI_test", None, None, "test", text_col="news", label_col="label",
                    licence="MIT"),
          notes="7 levels; folded to 3 when scored"),
    _task("headline", "headline", INSTRUCTION_TEMPLATE, ("Yes", "No"), "label",
          HubSource("FinGPT/fingpt-headline-cls", None, "train", "test", text_col="input",
                    label_col="output", fields=(("instruction", "instruction"),), licence="CC BY-SA 3.0"),
          fields=("instruction", "text"),
          defaults={"instruction": "Does the news headline talk about price going up? Please choose an answer from {Yes/No}."}),
    _task("ner", "ner", INSTRUCTION_TEMPLATE, ("person", "organization", "location"), "label",
          HubSource("FinGPT/fingpt-ner-cls", None, "train", "test", text_col="input",
                    label_col="output", fields=(("instruction", "instruction"),), licence="CC BY-SA 3.0"),
          fields=("instruction", "text")),
    _task("finer", "xbrl", "{text}", None, "text",
          HubSource("parquet", None, "train", "test", text_col="tokens", label_col="ner_tags",
                    licence="CC BY-SA 4.0",
                    data_files=tuple((sp, FINER_PARQUET.format(split=sp)) for sp in ("train", "test")),
                    origin="nlpaueb/finer-139 (the hub's parquet conversion)"),
          notes="FinLoRA's batching (data/process_finer.py): up to 3 tagged words a sentence, "
                "4 questions a prompt, 10,000 prompts a split"),
    _task("xbrl_extract", "xbrl", "{text}", None, "text",
          HubSource("json", None, "train", None, finlora_rows=True, licence="MIT", origin="FinLoRA data/train/xbrl_extract_train.jsonl",
                    data_files=(("train", FINLORA_LFS.format(commit="5ae0f9b4438a05bc63241708b99abd5a4971ff3b",
                                                             path="train/xbrl_extract_train.jsonl")),)),
          notes="FinLoRA's XBRL extraction prompts (tags, values, formulas) over filings' XML; no `make eval` set"),
    _task("xbrl_term", "xbrl", "Explain this XBRL term briefly in one sentence: {text}. Answer:", None, "text",
          HubSource("json", None, "train", None, finlora_rows=True, licence="MIT", origin="FinLoRA data/train/xbrl_term_train.jsonl",
                    data_files=(("train", FINLORA_RAW.format(commit="eb50f2382d11bbecf1efd83a692bb105d1ea6f3f",
                                                             path="train/xbrl_term_train.jsonl")),)),
          notes="XBRL-Agent terminology (MIT); the test file is not in FinLoRA's repository: SRC only"),
    _task("formula", "math",
          "Use formula {formula} to answer the question. Answer with a numerical answer with 2 decimal places "
          "and with no explanations or other text. Formula: {equation}, Explanation: {explanation}. "
          "Question: \"{text}\". Answer:", None, "number",
          HubSource("json", None, "train", "test", finlora_rows=True, licence="MIT", origin="FinLoRA data/{train,test}/formula_*.jsonl",
                    data_files=(("train", FINLORA_RAW.format(commit="99f37171a104a45912725d2a26617687d28ccb2c",
                                                             path="train/formula_train.jsonl")),
                                ("test", FINLORA_RAW.format(commit="902982d93afffe57b5a84ac7c64c198ef637ca7c",
                                                            path="test/formula_test.jsonl")))),
          fields=("formula", "equation", "explanation", "text"),
          notes="XBRL-Agent financial math (MIT)"),
    _task("financebench", "qa",
          "Answer the following question very briefly using scanned text from pages. No explanation needed. "
          "Question: {question}\nDocument Pages Context:\n{text}\n\nAnswer:", None, "text",
          HubSource("json", None, "train", "test", finlora_rows=True, licence="CC BY-NC 4.0",
                    origin="FinLoRA data/{train,test}/financebench_*.jsonl (PatronusAI/financebench via XBRL-Agent)",
                    data_files=(("train", FINLORA_RAW.format(commit="eb50f2382d11bbecf1efd83a692bb105d1ea6f3f",
                                                             path="train/financebench_train.jsonl")),
                                ("test", FINLORA_RAW.format(commit="783464c735f2b38229394d1574251e13235a55c3",
                                                            path="test/financebench_test.jsonl")))),
          fields=("question", "text")),
    _task("fingpt_sentiment", "sentiment", INSTRUCTION_TEMPLATE, SENTIMENT_MIX, "label",
          HubSource("FinGPT/fingpt-sentiment-train", None, "train", None, text_col="input", label_col="output",
                    fields=(("instruction", "instruction"),), licence="MIT"),
          fields=("instruction", "text"),
          notes="FinLoRA's sentiment training mix (76.8K rows: FPB, FiQA-SA, TFNS, NWGI, with their instructions); "
                "the GPU sentiment recipes train on it"),
]}


# Which `make eval` test sets (finlora.evaluate.EVAL_SETS) score an adapter of each recipe
# task, and which registry task converts the recipe task's training rows. The one place
# that says so: `make data RECIPE=x` writes these files, tests check them against evaluate.
RECIPE_TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sentiment": ("fingpt_sentiment", ("fpb", "fiqa", "tfns", "nwgi")),
    "headline": ("headline", ("headline",)),
    "ner": ("ner", ("ner",)),
    "finer": ("finer", ()),
    "xbrl_extract": ("xbrl_extract", ()),
    "xbrl_term": ("xbrl_term", ("xbrl_term",)),
    "formula": ("formula", ("formula",)),
    "financebench": ("financebench", ("financebench",)),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; tasks are: {', '.join(TASKS)}") from None
