"""Image preprocessing in numpy + Pillow, equal to the checkpoint's Hugging Face image processor.

The settings come from the manifest (``preprocess``), written at build time from the HF processor itself, so the
runtime never reads HF's config formats. Each processor kind is one function registered by name.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
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


DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS)


@contextmanager
def _opened(path, max_pixels: int | None, name: str | None = None):
    """``Image.open`` (header only) with every failure as one ``UsageError`` line, and images above ``max_pixels``
    refused before anything is decoded (our check in place of Pillow's decompression-bomb check). ``path``: a path or
    a binary file object (the server's request bytes), shown in messages as ``name`` when given."""
    shown = path if name is None else name
    limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else int(max_pixels)
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # opening reads the header only; the size is checked below, before decoding
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(path)
            except FileNotFoundError:
                raise UsageError(f"image not found: {shown}") from None
            except IsADirectoryError:
                raise UsageError(f"image {shown} is a folder, not a file") from None
            except (OSError, ValueError, SyntaxError) as err:  # Pillow raises these for bad or unknown files
                reason = err if name is None else "not an image file Pillow can read"  # no file object's repr
                raise UsageError(f"cannot read image {shown}: {reason}") from None
            width, height = image.size
            if width * height > limit:
                image.close()
                raise UsageError(f"image {shown} is {width}x{height} = {width * height} pixels, over "
                                 f"--max-image-pixels ({limit}); raise it if the image is trusted")
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def peek_image(path: str | Path, max_pixels: int | None = None) -> tuple[int, int]:
    """Check that ``path`` is an image within the pixel limit without decoding it; its (width, height)."""
    with _opened(path, max_pixels) as image:
        size = image.size
        image.close()
    return size


def load_image(path, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Decode the image at ``path`` (or from a binary file object, shown as ``name``): one ``UsageError`` line for a
    missing, broken or too large file."""
    shown = path if name is None else name
    with _opened(path, max_pixels, name) as image:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise UsageError(f"cannot decode image {shown}: {err}") from None
        except MemoryError:
            raise UsageError(f"image {shown} does not fit in memory") from None
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
    table = value_table(settings)  # (3, 256) float32
    pixels = np.empty((len(images), height, width, 3), dtype=np.uint8)  # (B, H, W, 3)
    for row, image in enumerate(images):
        if settings.get("do_convert_rgb", True):
            image = to_rgb(image)
        if settings.get("do_resize", True) and image.size != (width, height):  # Pillow copies at the same size
            image = image.resize((width, height), resample=Image.Resampling(settings["resample"]))
        pixels[row] = np.asarray(image)  # (H, W, 3)
    pixel_values = np.empty((len(images), 3, height, width), dtype=np.float32)  # (B, 3, H, W)
    for channel in range(3):  # the whole batch per channel; np.take is cheaper than fancy indexing (README "Speed")
        # mode "clip": 8-bit indices are always in range, and numpy buffers ``out`` in the default mode "raise"
        np.take(table[channel], pixels[..., channel], out=pixel_values[:, channel], mode="clip")  # (B, H, W)
    return {"pixel_values": pixel_values}


def value_table(settings: dict[str, Any]) -> np.ndarray:
    """(3, 256) float32: what rescale → normalise (float64, HF's order of operations) makes of each 8-bit value in
    each channel. A resized RGB image has only these 256 values per channel, so a lookup gives the same bits as
    computing every pixel — at a fraction of the cost (README "Speed")."""
    values = [settings.get(name) for name in ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")]
    key = tuple(tuple(value) if isinstance(value, list) else value for value in values)  # hashable, no JSON per call
    if key not in _TABLES:
        values = np.broadcast_to(np.arange(256, dtype=np.float64), (3, 256)).T  # (256, 3): every value, each channel
        if settings.get("do_rescale", True):
            values = values * settings["rescale_factor"]
        if settings.get("do_normalize", True):
            values = (values - np.asarray(settings["image_mean"])) / np.asarray(settings["image_std"])
        _TABLES[key] = np.ascontiguousarray(values.T.astype(np.float32))  # (3, 256)
    return _TABLES[key]


_TABLES: dict[tuple, np.ndarray] = {}


# ------------------------------------------------------------------------------------------------ Mllama


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """(tiles high, tiles wide) with at most ``max_tiles`` tiles, in HF's order; ``aspect_ratio_id`` = index + 1."""
    return [(high, wide) for high in range(1, max_tiles + 1) for wide in range(1, max_tiles + 1) if high * wide <= max_tiles]


def optimal_tiled_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """HF's ``get_optimal_tiled_canvas``: the canvas (h, w) needing the smallest upscale, else the least downscale;
    on equal scales the smallest area."""
    canvases = np.array(supported_aspect_ratios(max_tiles)) * tile  # (R, 2) (h, w)
    canvas_h, canvas_w = canvases[:, 0], canvases[:, 1]
    scale_h, scale_w = canvas_h / height, canvas_w / width
    scales = np.where(scale_w > scale_h, scale_h, scale_w)  # the binding side
    upscales = scales[scales >= 1]
    chosen = upscales.min() if upscales.size else scales[scales < 1].max()
    candidates = canvases[scales == chosen]
    best = candidates[np.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """HF's ``get_image_size_fit_to_canvas``: the resized (h, w), aspect ratio kept, within the canvas."""
    target_w = int(np.clip(width, tile, canvas_w))
    target_h = int(np.clip(height, tile, canvas_h))
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(int(np.floor(height * scale_w)) or 1, target_h), target_w
    return target_h, min(int(np.floor(width * scale_h)) or 1, target_w)


@register("mllama")
def preprocess_mllama(images: list[Image.Image], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    """LLaMA-3.2-Vision (``MllamaImageProcessorPil``), one image per prompt: RGB → resize to fit the best tiled
    canvas → pad (bottom/right, before normalising) → rescale → normalise → split into tiles.

    → pixel_values (B, 1, max_tiles, 3, tile, tile) float32 (missing tiles 0), aspect_ratio_ids (B, 1) int64,
    aspect_ratio_mask (B, 1, max_tiles) int64, num_tiles (B,) int64.
    """
    tile, max_tiles = int(settings["tile_size"]), int(settings["max_image_tiles"])
    ratios = supported_aspect_ratios(max_tiles)
    batch = len(images)
    pixel_values = np.zeros((batch, 1, max_tiles, 3, tile, tile), dtype=np.float32)
    aspect_ratio_ids = np.zeros((batch, 1), dtype=np.int64)
    aspect_ratio_mask = np.zeros((batch, 1, max_tiles), dtype=np.int64)
    num_tiles = np.zeros(batch, dtype=np.int64)
    mean = np.asarray(settings["image_mean"], dtype=np.float32)
    std = np.asarray(settings["image_std"], dtype=np.float32)
    for row, image in enumerate(images):
        if settings.get("do_convert_rgb", True):
            image = to_rgb(image)
        width, height = image.size
        canvas_h, canvas_w = optimal_tiled_canvas(height, width, max_tiles, tile)
        tiles_h, tiles_w = canvas_h // tile, canvas_w // tile
        new_h, new_w = fit_to_canvas(height, width, canvas_h, canvas_w, tile)
        resized = np.asarray(image.resize((new_w, new_h), resample=Image.Resampling(settings["resample"])))
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # padding is 0 before normalising
        canvas[:new_h, :new_w] = resized
        pixels = canvas.astype(np.float64)
        if settings.get("do_rescale", True):
            pixels = pixels * settings["rescale_factor"]
        pixels = pixels.astype(np.float32)
        if settings.get("do_normalize", True):
            pixels = (pixels - mean) / std
        chw = pixels.transpose(2, 0, 1)  # (3, canvas_h, canvas_w)
        tiles = chw.reshape(3, tiles_h, tile, tiles_w, tile).transpose(1, 3, 0, 2, 4).reshape(tiles_h * tiles_w, 3, tile, tile)
        pixel_values[row, 0, : len(tiles)] = tiles
        aspect_ratio_ids[row, 0] = ratios.index((tiles_h, tiles_w)) + 1
        aspect_ratio_mask[row, 0, : len(tiles)] = 1
        num_tiles[row] = len(tiles)
    return {"pixel_values": pixel_values, "aspect_ratio_ids": aspect_ratio_ids, "aspect_ratio_mask": aspect_ratio_mask,
            "num_tiles": num_tiles}


def preprocess(images: list[Image.Image], settings: dict[str, Any]) -> dict[str, np.ndarray]:
    kind = settings["kind"]
    if kind not in PREPROCESSORS:
        raise UsageError(f"this runtime has no image preprocessor {kind!r} (known: {', '.join(PREPROCESSORS)})")
    return PREPROCESSORS[kind](images, settings)
