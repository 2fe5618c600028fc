"""VQA data sets and metrics, torch-free: easy-VQA (via the ``easy-vqa`` package) and VQAv2-format sets
(questions JSON + annotations JSON + image folder), with the official VQA accuracy.

The normalisation follows the official evaluation (``vqaEval.py`` of the VQA challenge): the prediction goes
through punctuation processing, then digit/article processing (lower-case, number words → digits, articles
dropped, contractions restored); the ten human answers get punctuation processing only, and only when they are
not all identical. Accuracy per question = the mean, over the ten leave-one-out subsets of nine humans, of
``min(#humans in the subset who gave the prediction / 3, 1)``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import UsageError

# ------------------------------------------------------------------------------------------------ normalisation

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as the official script writes it (a period not followed by a digit)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official table of contractions written without apostrophes → with them (its entries, its typography).
_CONTRACTIONS = dict(
    pair.split("=") for pair in (
        "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn’t’ve "
        "couldnt’ve=couldn’t’ve didnt=didn’t doesnt=doesn’t dont=don’t hadnt=hadn’t hadnt’ve=hadn’t’ve "
        "hadn'tve=hadn’t’ve hasnt=hasn’t havent=haven’t hed=he’d hed’ve=he’d’ve he’dve=he’d’ve hes=he’s "
        "howd=how’d howll=how’ll hows=how’s Id’ve=I’d’ve I’dve=I’d’ve Im=I’m Ive=I’ve isnt=isn’t itd=it’d "
        "itd’ve=it’d’ve it’dve=it’d’ve itll=it’ll let’s=let’s maam=ma’am mightnt=mightn’t mightnt’ve=mightn’t’ve "
        "mightn’tve=mightn’t’ve mightve=might’ve mustnt=mustn’t mustve=must’ve neednt=needn’t notve=not’ve "
        "oclock=o’clock oughtnt=oughtn’t ow’s’at=’ow’s’at ’ows’at=’ow’s’at ’ow’sat=’ow’s’at shant=shan’t "
        "shed’ve=she’d’ve she’dve=she’d’ve she’s=she’s shouldve=should’ve shouldnt=shouldn’t "
        "shouldnt’ve=shouldn’t’ve shouldn’tve=shouldn’t’ve somebody’d=somebodyd somebodyd’ve=somebody’d’ve "
        "somebody’dve=somebody’d’ve somebodyll=somebody’ll somebodys=somebody’s someoned=someone’d "
        "someoned’ve=someone’d’ve someone’dve=someone’d’ve someonell=someone’ll someones=someone’s "
        "somethingd=something’d somethingd’ve=something’d’ve something’dve=something’d’ve somethingll=something’ll "
        "thats=that’s thered=there’d thered’ve=there’d’ve there’dve=there’d’ve therere=there’re theres=there’s "
        "theyd=they’d theyd’ve=they’d’ve they’dve=they’d’ve theyll=they’ll theyre=they’re theyve=they’ve "
        "twas=’twas wasnt=wasn’t wed’ve=we’d’ve we’dve=we’d’ve weve=we've werent=weren’t whatll=what’ll "
        "whatre=what’re whats=what’s whatve=what’ve whens=when’s whered=where’d wheres=where's whereve=where’ve "
        "whod=who’d whod’ve=who’d’ve who’dve=who’d’ve wholl=who’ll whos=who’s whove=who've whyll=why’ll "
        "whyre=why’re whys=why’s wont=won’t wouldve=would’ve wouldnt=wouldn’t wouldnt’ve=wouldn’t’ve "
        "wouldn’tve=wouldn’t’ve yall=y’all yall’ll=y’all’ll y’allll=y’all’ll yall’d’ve=y’all’d’ve "
        "y’alld’ve=y’all’d’ve y’all’dve=y’all’d’ve youd=you’d youd’ve=you’d’ve you’dve=you’d’ve youll=you’ll "
        "youre=you’re youve=you’ve"
    ).split()
)


def process_punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if strip_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """The official processing of a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """Official VQA accuracy of one prediction against the (usually ten) human answers."""
    predicted = normalize_answer(prediction)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(humans)) > 1:
        humans = [process_punctuation(a) for a in humans]
    scores = []
    for left_out in range(len(humans)):
        matches = sum(1 for i, answer in enumerate(humans) if i != left_out and answer == predicted)
        scores.append(min(1.0, matches / 3.0))
    return float(np.mean(scores)) if scores else 0.0


def exact_match(prediction: str, answers: list[str]) -> float:
    """easy-VQA: one ground truth; exact match after the official normalisation of both sides."""
    return float(normalize_answer(prediction) == normalize_answer(answers[0]))


# ------------------------------------------------------------------------------------------------ data sets


@dataclass
class Sample:
    question_id: int
    image: str
    question: str
    answers: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    name: str
    split: str
    samples: list[Sample]
    metric: str  # "exact_match" | "vqa_accuracy"

    def score(self, prediction: str, sample: Sample) -> float:
        return (vqa_accuracy if self.metric == "vqa_accuracy" else exact_match)(prediction, sample.answers)


def load_easy_vqa(split: str = "test") -> Dataset:
    try:
        import easy_vqa
    except ImportError:
        raise UsageError("easy-VQA needs the 'easy-vqa' package: pip install easy-vqa") from None
    if split not in ("train", "test"):
        raise UsageError(f"easy-VQA has the splits train and test, not {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    samples = [Sample(i, paths[image_id], q, [a]) for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids))]
    return Dataset("easy-vqa", split, samples, "exact_match")


def _find_image(folder: Path, image_id: int, subtype: str | None) -> str:
    candidates = []
    if subtype:
        candidates.append(folder / f"COCO_{subtype}_{image_id:012d}.jpg")
    candidates += [folder / f"{image_id}.jpg", folder / f"{image_id}.png"]
    for path in candidates:
        if path.is_file():
            return str(path)
    matches = sorted(folder.glob(f"*{image_id:012d}.*"))
    if matches:
        return str(matches[0])
    raise UsageError(f"no image for image_id {image_id} in {folder}")


def load_vqav2(questions_file: Path, annotations_file: Path, images: Path) -> Dataset:
    for path in (questions_file, annotations_file):
        if path is None or not Path(path).is_file():
            raise UsageError(f"--dataset vqav2 needs --questions, --annotations and --images (missing: {path})")
    if images is None or not Path(images).is_dir():
        raise UsageError(f"--images must be a folder of images, got {images}")
    questions = json.loads(Path(questions_file).read_text())
    annotations = {a["question_id"]: a for a in json.loads(Path(annotations_file).read_text())["annotations"]}
    subtype = questions.get("data_subtype")
    samples = []
    for record in questions["questions"]:
        annotation = annotations.get(record["question_id"])
        if annotation is None:
            raise UsageError(f"question {record['question_id']} has no annotation in {annotations_file}")
        samples.append(Sample(record["question_id"], _find_image(Path(images), record["image_id"], subtype),
                              record["question"], [a["answer"] for a in annotation["answers"]]))
    return Dataset("vqav2", subtype or "custom", samples, "vqa_accuracy")


def subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``limit`` questions (kept in data set order), or everything."""
    if limit is None or limit >= len(dataset.samples):
        return dataset
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    chosen = np.sort(np.random.default_rng(seed).permutation(len(dataset.samples))[:limit])
    return Dataset(dataset.name, dataset.split, [dataset.samples[i] for i in chosen], dataset.metric)
