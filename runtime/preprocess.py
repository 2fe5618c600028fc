"""Image preprocessing in numpy + Pillow, equal to the checkpoint's Hugging Face image processor.

The settings come from the manifest (``preprocess``), written at build time from the HF processor itself, so the
runtime never reads HF's config formats. Each processor kind is one function registered by name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from runtime.errors import UsageError

Preprocessor = Callable[[list[Image.Image], dict[str, Any]], dict[str, np.ndarray]]
PREPROCESSORS: dict[str, Preprocessor] = {}


def register(kind: str) -> Callable[[Preprocessor], Preprocessor]:
    def wrap(fn: Preprocessor) -> Preprocessor:
        PREPROCESSORS[kind] = fn
        return fn

    return wrap


def load_image(path: str | Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}") from None
    except OSError as err:
        raise UsageError(f"cannot read image {path}: {err}") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (as ``transformers.image_transforms.convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


@register("blip")
def preprocess_blip(images: list[Image.Image], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """BLIP/BLIP-2 (``BlipImageProcessorPil``): RGB → resize (H, W) → rescale → normalise → (B, 3, H, W) float32."""
    height, width = settings["size"]
    batch = []
    for image in images:
        if settings.get("do_convert_rgb", True):
            image = to_rgb(image)
        if settings.get("do_resize", True):
            image = image.resize((width, height), resample=Image.Resampling(settings["resample"]))
        pixels = np.asarray(image).astype(np.float64)  # (H, W, 3)
        if settings.get("do_rescale", True):
            pixels = pixels * settings["rescale_factor"]
        if settings.get("do_normalize", True):
            pixels = (pixels - np.asarray(settings["image_mean"])) / np.asarray(settings["image_std"])
        batch.append(pixels.transpose(2, 0, 1).astype(np.float32))  # (3, H, W)
    return {"pixel_values": np.stack(batch)}


def preprocess(images: list[Image.Image], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    kind = settings["kind"]
    if kind not in PREPROCESSORS:
        raise UsageError(f"this runtime has no image preprocessor {kind!r} (known: {', '.join(PREPROCESSORS)})")
    return PREPROCESSORS[kind](images, settings)
