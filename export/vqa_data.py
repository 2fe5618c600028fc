"""VQA data sets for the evaluation: easy-VQA (via the ``easy-vqa`` package) and VQAv2-format sets (questions
JSON + annotations JSON + image folder), loaded into ``runtime.vqa``'s records and scored by its metrics.

A data set is an evaluation concern, not a deployment one: the runtime answers questions and, through
``runtime/vqa.py``, scores answers; reading data sets (and the optional ``easy-vqa`` package, imported only when
easy-VQA is asked for) stays here, beside the evaluation that uses it. Every problem with the inputs — a split
easy-VQA lacks, a missing file, an annotation-less question, an image not found — is a one-line ``UsageError``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from runtime.errors import UsageError
from runtime.vqa import Dataset, Sample


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
        raise UsageError("easy-VQA needs the 'easy-vqa' package: pip install easy-vqa (or pip install -e '.[eval]')") from None
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
