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
# FinGPT's instruction datasets (headline, NER) carry the instruction per row.
INSTRUCTION_TEMPLATE = "Instruction: {instruction}\nInput: {text}\nAnswer: "


@dataclass(frozen=True)
class HubSource:
    """Where `datasets.load_dataset` finds the original set, and how to read it."""

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


def _task(*args, **kw) -> Task:
    return Task(*args, **kw)


TASKS: dict[str, Task] = {t.name: t for t in [
    _task("sentiment", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
          notes="generic 3-class financial sentiment (news template); the CPU default"),
    _task("fpb", "sentiment", SENTIMENT_NEWS, SENTIMENT3, "label",
          HubSource("takala/financial_phrasebank", "sentences_50agree", "train", None,
                    text_col="sentence", label_map="fpb", licence="CC BY-NC-SA 3.0"),
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
          HubSource("nlpaueb/finer-139", None, "train", "test", text_col="tokens", label_col="ner_tags",
                    licence="CC BY-SA 4.0"),
          notes="FinLoRA batches 4 tagging questions per prompt (data/process_finer.py); "
                "convert with that script and read the result with --format finlora"),
    _task("xbrl_extract", "xbrl", "{instruction}\nXML File: {xml}\n{text}", None, "text",
          HubSource("wangd12/XBRL_extraction", "tags", "train", "test", text_col="input",
                    label_col="output", fields=(("instruction", "instruction"),), licence="MIT"),
          fields=("instruction", "xml", "text"),
          notes="configs tags, value, formula, formula_calculations; the XML comes from the filings"),
    _task("xbrl_term", "xbrl", "Explain this XBRL term briefly in one sentence: {text}. Answer:", None, "text",
          notes="XBRL-Agent terminology (MIT); read FinLoRA's xbrl_term_*.jsonl with --format finlora"),
    _task("formula", "math",
          "Use formula {formula} to answer the question. Answer with a numerical answer with 2 decimal places "
          "and with no explanations or other text. Formula: {equation}, Explanation: {explanation}. "
          "Question: \"{text}\". Answer:", None, "number",
          fields=("formula", "equation", "explanation", "text"),
          notes="XBRL-Agent financial math (MIT); read FinLoRA's formula_*.jsonl with --format finlora"),
    _task("financebench", "qa",
          "Answer the following question very briefly using scanned text from pages. No explanation needed. "
          "Question: {question}\nDocument Pages Context:\n{text}\n\nAnswer:", None, "text",
          HubSource("PatronusAI/financebench", None, None, "train", text_col="evidence_text",
                    label_col="answer", fields=(("question", "question"),), licence="CC BY-NC 4.0"),
          fields=("question", "text")),
]}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise SystemExit(f"error: unknown task {name!r}; tasks are: {', '.join(TASKS)}") from None
