"""A person's own image of a handwritten digit -> a 28x28 MNIST digit, made the way MNIST was made: grayscale,
bright on black, cropped to the digit, fitted into 20x20 (aspect ratio kept, anti-aliased), centred by mass."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.common.errors import StageError, first_line

MNIST_SIZE, DIGIT_BOX = 28, 20  # sides of the output image and of the box the digit is fitted into
INK_FRACTION = 0.25  # a pixel brighter than this fraction of the digit's maximum counts for the bounding box
MIN_CONTRAST = 32.0  # gray levels (of 255) between background and digit below which an image is blank
PAPER_SIDE = 96  # the paper's brightness is measured on the image shrunk to at most this many pixels a side
PAPER_WINDOW = 0.25  # over a square window this fraction of the shorter side wide: wider than the strokes


def load_image(path: str | Path) -> np.ndarray:
    """The image at `path` as a 2-D float32 array of gray levels 0-255; StageError if unreadable or blank."""
    try:
        with Image.open(path) as image:
            gray = grayscale(ImageOps.exif_transpose(image))
    except UnidentifiedImageError:
        if Path(path).stat().st_size == 0:
            raise StageError(f"{path}: the file is empty (0 bytes)") from None
        raise StageError(f"{path}: not an image (or not a format Pillow can read)") from None
    # Missing, a folder, truncated, corrupt, too large.
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
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
    """The digit bright on a zero background (ValueError if blank). Ink: the extreme further from the border's
    median, right even for tightly cropped digits; background: the `paper` around each pixel."""
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
    """The paper's brightness at each pixel, so that light fading across the page is not taken for ink: a
    grayscale closing (dark ink) or opening, on a small copy. Edges extended by odd reflection, which follows
    light that changes linearly (scipy.ndimage's filters have no such mode)."""
    small = resized(gray, min(1.0, PAPER_SIDE / max(gray.shape)), Image.Resampling.BOX)
    window = max(3, round(PAPER_WINDOW * min(small.shape)))
    before = window // 2
    for extreme in (np.max, np.min) if dark_ink else (np.min, np.max):
        for axis in (0, 1):
            padding = [(before, window - 1 - before) if a == axis else (0, 0) for a in (0, 1)]
            padded = np.pad(small, padding, "reflect", reflect_type="odd")
            small = extreme(np.lib.stride_tricks.sliding_window_view(padded, window, axis=axis), axis=-1)
    height, width = gray.shape
    return np.asarray(Image.fromarray(small.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))


def resized(values: np.ndarray, scale: float, method: Image.Resampling) -> np.ndarray:
    """`values` scaled by `scale` with Pillow's `method`, each side at least one pixel."""
    height, width = values.shape
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(size, method), dtype=np.float64)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Gray levels 0-255 (any size, either polarity) as a uint8 (28, 28) MNIST digit; ValueError if blank."""
    digit = digit_on_black(gray)
    rows, cols = np.nonzero(digit > INK_FRACTION * digit.max())  # the bounding box, paper noise ignored
    digit = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    digit = np.clip(resized(digit, DIGIT_BOX / max(digit.shape), Image.Resampling.LANCZOS), 0.0, None)
    # Shifted so that its centre of mass is nearest the field's centre, the whole digit inside.
    height, width = digit.shape
    rows, cols = np.indices(digit.shape)
    top = min(max(round(MNIST_SIZE / 2 - (rows * digit).sum() / digit.sum()), 0), MNIST_SIZE - height)
    left = min(max(round(MNIST_SIZE / 2 - (cols * digit).sum() / digit.sum()), 0), MNIST_SIZE - width)
    field = np.zeros((MNIST_SIZE, MNIST_SIZE))
    field[top : top + height, left : left + width] = digit
    return np.clip(np.rint(field * (255.0 / field.max())), 0, 255).astype(np.uint8)
