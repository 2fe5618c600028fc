"""VQA metrics, torch-free and dependency-free: the official answer normalisation and VQA accuracy, easy-VQA's
exact match, and the records a scored data set is made of (``Sample``, ``Dataset``).

Loading data sets (easy-VQA via the ``easy-vqa`` package, VQAv2-format files) is an evaluation concern and lives
in ``export/vqa_data.py``; this module only scores answers, so that anything with predictions — the evaluation,
or a deployment with only the runtime installed — gets the official numbers.

The answer normalisation and the accuracy are a port of the official evaluation script, ``vqaEval.py`` of
GT-Vision-Lab/VQA (``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, master, the Python 3 revision), including
its quirks, so that numbers here equal the official ones:

- the **prediction** gets ``\\n``/``\\t`` → space, ``strip``, ``processPunctuation``, ``processDigitArticle``;
- the **human answers** get ``processPunctuation`` only, and only when they are not all identical (no
  lower-casing, no number words, no articles: the official annotation files are already normalised);
- accuracy = mean over the leave-one-out subsets (ten of nine humans) of ``min(#matches in the subset / 3, 1)``.

An older revision of ``vqaEval.py`` (Python 2) had curly apostrophes in its contractions table and another
punctuation list (with ``:`` and ``'``, without ``{ } - !``); this port follows the current one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

# ------------------------------------------------------------------------------------------------ normalisation

# vqaEval.py ``contractions``: forms without apostrophes → with them. Keys with capitals (``Im``, ``Ive``,
# ``Id've``, ``I'dve``) can never match, since words are lower-cased first; kept as the official table has them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Verbatim. ``(?!<=\d)`` is a negative *lookahead* (a typo for a lookbehind) that never fires before a period,
# so the pattern removes every period not followed by a digit: "dog." → "dog", "3.5" kept, "5." → "5".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official call is ``periodStrip.sub("", outText, re.UNICODE)``: in Python 3 the flag lands in ``count``,
# so at most 32 periods are removed. Kept for equality with the official numbers.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """vqaEval.py ``processPunctuation``. Each mark is deleted when it touches a space anywhere in the *input*
    (``"p "`` or ``" p"``) or when the input has a comma between digits ("1,000"); otherwise it becomes a space.
    Then periods not followed by a digit are deleted."""
    out = text
    digits_comma = COMMA_STRIP.search(text) is not None
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or digits_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.py ``processDigitArticle``: lower-case, split on whitespace, number words → digits, drop the
    articles a/an/the, restore contractions, join with single spaces."""
    words = [MANUAL_MAP.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official processing of a *predicted* answer: whitespace clean-up, punctuation, digits/articles."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the (usually ten) human answers.

    As vqaEval.py: the prediction is normalised with :func:`normalize_answer`; the human answers are used as
    given, except that when they are not all identical each one goes through ``processPunctuation`` (only that:
    not lower-cased, no number words or articles handled). Then for each human ``i``, acc_i = min(#humans j ≠ i
    whose answer equals the prediction / 3, 1), and the accuracy is the mean of acc_i.
    """
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(answer) for answer in humans]
    matches = sum(answer == predicted for answer in humans)
    # leaving out a matching human leaves matches - 1 in the subset, leaving out another leaves matches
    scores = [min(1.0, (matches - (answer == predicted)) / 3.0) for answer in humans]
    return float(sum(scores) / len(scores))


def exact_match(prediction: str, answer: str) -> float:
    """easy-VQA's metric (one ground truth per question): 1.0 when both sides are equal after
    :func:`normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


# ------------------------------------------------------------------------------------------------ data sets

METRICS = ("exact_match", "vqa_accuracy")


@dataclass(frozen=True)
class Sample:
    image: str  # path of the image file
    question: str
    answers: tuple[str, ...]  # easy-VQA: the one ground truth; VQAv2: the human answers (usually ten)
    question_id: int
    answer_type: str = "other"  # easy-VQA: yes/no | color | shape; VQAv2: the annotation's answer_type


@dataclass
class Dataset:
    name: str  # "easy-vqa" | "vqav2"
    split: str
    samples: list[Sample]
    metric: str  # one of METRICS

    def score(self, prediction: str, sample: Sample) -> float:
        if self.metric == "vqa_accuracy":
            return vqa_accuracy(prediction, sample.answers)
        return exact_match(prediction, sample.answers[0])

    def __len__(self) -> int:
        return len(self.samples)
