"""VQA data sets and metrics, torch-free: easy-VQA (via the ``easy-vqa`` package) and VQAv2-format sets
(questions JSON + annotations JSON + image folder), with the official VQA accuracy.

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

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from runtime.errors import UsageError

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


class VqaV2Files(NamedTuple):
    questions: Path  # {"questions": [{"image_id", "question", "question_id"}], "data_subtype": "val2014"?}
    annotations: Path  # {"annotations": [{"question_id", "image_id", "answers": [{"answer": ...}, ...]}]}
    images: Path  # folder of images


EASY_VQA_SPLITS = ("train", "test")
EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


def easy_vqa_answer_type(answer: str) -> str:
    """easy-VQA's three kinds of answer: ``yes/no``, ``shape`` (circle, rectangle, triangle) or ``color``."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "color"


def load_easy_vqa(split: str = "test") -> Dataset:
    """easy-VQA from the ``easy-vqa`` package; ``question_id`` is the index in the split's question list."""
    if split not in EASY_VQA_SPLITS:
        raise UsageError(f"easy-VQA has the splits {' and '.join(EASY_VQA_SPLITS)}, not {split!r}")
    try:
        import easy_vqa
    except ImportError:
        raise UsageError("easy-VQA needs the 'easy-vqa' package: pip install easy-vqa (or pip install -e '.[dev]')") from None
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    samples = []
    for index, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
        if image_id not in paths:
            raise UsageError(f"easy-VQA {split}: question {index} refers to image {image_id}, which the package lacks")
        samples.append(Sample(paths[image_id], question, (answer,), index, easy_vqa_answer_type(answer)))
    return Dataset("easy-vqa", split, samples, "exact_match")


class ImageFinder:
    """Image files of a VQAv2-format folder, by ``image_id``. Tried in order: ``COCO_{subtype}_{id:012d}.jpg``
    (``subtype`` = the questions file's ``data_subtype``), any file whose name ends with ``{id:012d}.jpg`` or
    ``.png`` (first by name), ``{id}.jpg``, ``{id}.png``. The folder is listed once."""

    def __init__(self, folder: Path, subtype: str | None):
        self.folder, self.subtype = Path(folder), subtype
        names = sorted(entry.name for entry in self.folder.iterdir() if entry.is_file())
        self.names = set(names)
        self.by_suffix: dict[str, str] = {}
        for name in names:
            self.by_suffix.setdefault(name[-16:], name)  # "{id:012d}.jpg" is 16 characters

    def candidates(self, image_id: int) -> list[str]:
        coco = [f"COCO_{self.subtype}_{image_id:012d}.jpg"] if self.subtype else []
        return coco + [f"*{image_id:012d}.jpg", f"*{image_id:012d}.png", f"{image_id}.jpg", f"{image_id}.png"]

    def __call__(self, image_id: int) -> str:
        for pattern in self.candidates(image_id):
            name = self.by_suffix.get(pattern[1:]) if pattern.startswith("*") else (pattern if pattern in self.names else None)
            if name is not None:
                return str(self.folder / name)
        raise UsageError(f"no image for image_id {image_id} in {self.folder} (tried {', '.join(self.candidates(image_id))})")


def _read_json(path: Path, key: str, flag: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{flag} {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UsageError(f"{flag} {path} has no {key!r} list (VQAv2 format expected)")
    return data


def load_vqav2(questions_file: str | Path, annotations_file: str | Path, images: str | Path) -> Dataset:
    """A VQAv2-format set: every question of the questions file, with the human answers of its annotation."""
    missing = [flag for flag, value in (("--questions", questions_file), ("--annotations", annotations_file),
                                        ("--images", images)) if value is None]
    if missing:
        raise UsageError(f"--dataset vqav2 needs --questions, --annotations and --images (missing: {', '.join(missing)})")
    if not Path(images).is_dir():
        raise UsageError(f"--images {images} is not a folder")
    questions = _read_json(Path(questions_file), "questions", "--questions")
    annotations = {a["question_id"]: a for a in _read_json(Path(annotations_file), "annotations", "--annotations")["annotations"]}
    subtype = questions.get("data_subtype")
    find = ImageFinder(Path(images), subtype)
    samples = []
    for record in questions["questions"]:
        try:
            question_id, image_id, question = record["question_id"], int(record["image_id"]), record["question"]
        except (KeyError, TypeError, ValueError):
            raise UsageError(f"--questions {questions_file}: a question lacks question_id, image_id or question: {record!r}") from None
        annotation = annotations.get(question_id)
        if annotation is None:
            raise UsageError(f"question {question_id} has no annotation in {annotations_file}")
        answers = tuple(str(a["answer"]) for a in annotation.get("answers", ()))
        if not answers:
            raise UsageError(f"question {question_id} has no human answers in {annotations_file}")
        samples.append(Sample(find(image_id), question, answers, question_id, str(annotation.get("answer_type", "other"))))
    if not samples:
        raise UsageError(f"--questions {questions_file} has no questions")
    return Dataset("vqav2", subtype or "custom", samples, "vqa_accuracy")


def subset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset of ``limit`` questions (``numpy.random.default_rng(seed)``), kept in data set
    order; deterministic for a seed. ``None`` (or a limit at least the size of the set) keeps everything."""
    if limit is None:
        return dataset
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if limit >= len(dataset.samples):
        return dataset
    chosen = np.sort(np.random.default_rng(seed).permutation(len(dataset.samples))[:limit])
    return Dataset(dataset.name, dataset.split, [dataset.samples[i] for i in chosen], dataset.metric)


def load_dataset(
    name_or_paths: str | VqaV2Files | Sequence, split: str = "test", limit: int | None = None, seed: int = 0
) -> Dataset:
    """``"easy-vqa"`` (``split`` train|test), or VQAv2 format given as ``VqaV2Files(questions, annotations,
    images)`` (or any 3-sequence of paths); then :func:`subset` with ``limit`` and ``seed``."""
    if isinstance(name_or_paths, str):
        if name_or_paths == "easy-vqa":
            dataset = load_easy_vqa(split)
        elif name_or_paths == "vqav2":
            raise UsageError("--dataset vqav2 needs --questions, --annotations and --images")
        else:
            raise UsageError(f"--dataset must be easy-vqa or vqav2, got {name_or_paths!r}")
    else:
        dataset = load_vqav2(*VqaV2Files(*name_or_paths))
    return subset(dataset, limit, seed)
