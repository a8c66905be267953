"""A person's own image of a handwritten digit -> a 28x28 MNIST-style image, made the way MNIST was made.

Grayscale; digit made bright on black; cropped to the digit's bounding box; fitted into a 20x20 box
(aspect ratio kept, anti-aliased); placed in 28x28 with its centre of mass at (14, 14).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.common.errors import StageError, first_line

MNIST_SIZE = 28  # side of the output image
DIGIT_BOX = 20  # side of the box the digit is fitted into
INK_FRACTION = 0.25  # a pixel brighter than this fraction of the digit's maximum counts for the bounding box
MIN_CONTRAST = 32.0  # gray levels (of 255) between background and digit below which an image is blank
PAPER_SIDE = 96  # the paper's brightness is measured on the image shrunk to at most this many pixels a side
PAPER_WINDOW = 0.25  # over a square window this fraction of the shorter side wide: wider than the strokes
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def load_image(path: str | Path) -> np.ndarray:
    """The image at `path` as a 2-D float32 array of gray levels 0-255; StageError if unreadable or blank."""
    try:
        with Image.open(path) as image:
            gray = grayscale(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        if Path(path).stat().st_size == 0:
            raise StageError(f"{path}: the file is empty (0 bytes)") from None
        raise StageError(f"{path}: not an image (or not a format Pillow can read)") from None
    except IMAGE_ERRORS as exc:  # missing, a folder, truncated, corrupt, too large
        raise StageError(f"{path}: cannot read the image: {getattr(exc, 'strerror', None) or first_line(exc)}") from exc
    try:
        digit_on_black(gray)
    except ValueError as exc:
        raise StageError(f"{path}: {exc}") from None
    return gray


def grayscale(image: Image.Image) -> np.ndarray:
    """Gray levels 0-255 of a Pillow image; transparent parts become paper of the colour opposite the ink."""
    if image.mode.startswith("I"):  # 16- or 32-bit grayscale, as Pillow reads 16-bit PNGs
        return np.asarray(image, dtype=np.float32) / 257.0
    gray, alpha = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32).transpose(2, 0, 1)
    if alpha.min() == 255:
        return gray
    alpha /= 255.0
    ink = np.average(gray, weights=alpha) if alpha.any() else 0.0
    paper = 255.0 if ink < 128 else 0.0
    return gray * alpha + paper * (1.0 - alpha)


def digit_on_black(gray: np.ndarray) -> np.ndarray:
    """The digit bright on a zero background, inverted if the ink is darker than the paper.

    Which is ink: whichever extreme, darkest or brightest, lies further from the median of the border
    pixels (right even for tightly cropped digits). The paper's brightness is then measured around each
    pixel (`paper`), so that light fading across the page does not turn its dim side into ink.
    ValueError if the image is blank.
    """
    gray = np.asarray(gray, dtype=np.float64)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale array, got shape {gray.shape}")
    border = np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]]))
    dark_ink = border - gray.min() > gray.max() - border
    background = paper(gray, dark_ink)
    digit = np.clip(background - gray if dark_ink else gray - background, 0.0, None)
    if digit.max() < MIN_CONTRAST:
        raise ValueError(f"blank image: no digit found (contrast {digit.max():.0f} of 255, need {MIN_CONTRAST:.0f})")
    return digit


def paper(gray: np.ndarray, dark_ink: bool) -> np.ndarray:
    """The paper's brightness at each pixel, the ink taken away: the brightest (dark ink) or darkest level
    of the surroundings, then the opposite extreme of that (a grayscale closing or opening) over a window
    wider than any stroke. Measured on a copy at most PAPER_SIDE pixels a side, enlarged back. Exact for
    light that changes linearly across the page (the edges are extended linearly, not repeated)."""
    height, width = gray.shape
    scale = min(1.0, PAPER_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(gray.astype(np.float32)).resize(size, Image.Resampling.BOX), np.float64)
    window = max(3, round(PAPER_WINDOW * min(small.shape)))
    first, then = (np.max, np.min) if dark_ink else (np.min, np.max)
    for extreme in (first, then):
        for axis in (0, 1):
            small = sliding(small, window, axis, extreme)
    return np.asarray(Image.fromarray(small.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))


def sliding(values: np.ndarray, window: int, axis: int, extreme) -> np.ndarray:
    """`extreme` (np.max or np.min) over a window of `window` values centred on each, along `axis`."""
    before = window // 2
    padded = np.pad(
        values,
        [(before, window - 1 - before) if a == axis else (0, 0) for a in range(2)],
        "reflect",
        reflect_type="odd",
    )
    return extreme(np.lib.stride_tricks.sliding_window_view(padded, window, axis=axis), axis=-1)


def crop_to_digit(digit: np.ndarray) -> np.ndarray:
    """`digit` cut to the bounding box of its pixels above INK_FRACTION of its maximum (paper noise ignored)."""
    rows, cols = np.nonzero(digit > INK_FRACTION * digit.max())
    return digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def fit_box(digit: np.ndarray, side: int = DIGIT_BOX) -> np.ndarray:
    """`digit` resized (aspect ratio kept, anti-aliased) so that its longer side is `side` pixels."""
    height, width = digit.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(digit.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, None)


def center_by_mass(digit: np.ndarray, side: int = MNIST_SIZE) -> np.ndarray:
    """`digit` placed in a side x side field, shifted so its centre of mass is nearest (side/2, side/2).

    The shift is clamped so that the whole digit stays inside the field.
    """
    height, width = digit.shape
    rows, cols = np.indices(digit.shape)
    total = digit.sum()
    top = round(side / 2 - (rows * digit).sum() / total)
    left = round(side / 2 - (cols * digit).sum() / total)
    top, left = min(max(top, 0), side - height), min(max(left, 0), side - width)
    field = np.zeros((side, side))
    field[top : top + height, left : left + width] = digit
    return field


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """A grayscale image (gray levels 0-255, any size, either polarity) as a uint8 (28, 28) MNIST digit.

    ValueError if the image is blank; load_image turns that into a StageError naming the file.
    """
    field = center_by_mass(fit_box(crop_to_digit(digit_on_black(gray))))
    return np.clip(np.rint(field * (255.0 / field.max())), 0, 255).astype(np.uint8)
