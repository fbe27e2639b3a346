"""Image files as arrays of one shape: what `ddl predict --image` classifies and `ddl prepare
--resize` writes.

Colour: one channel is Pillow's "L" conversion (ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B),
three are "RGB" (an alpha channel dropped, a palette expanded). Size: an image of another size is
resized with Pillow's bilinear filter (`Image.resize(..., Image.BILINEAR)`, which also averages over
the covered pixels when it shrinks), to exactly H x W: the aspect ratio is not kept.
"""
import numpy as np

from ddl.errors import UsageError, dims, one_line


def size(text, option="--resize"):
    """(H, W) from "HxW" (e.g. "32x32"), both at least 1; UsageError otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise UsageError(f"{option} {text}: expected HEIGHTxWIDTH in pixels, e.g. 32x32")
    return h, w


def convert(im, shape):
    """The Pillow image `im` as uint8 (C, H, W) of `shape`: its colour converted, resized if its
    size differs (see the module's doc)."""
    from PIL import Image
    c, h, w = shape
    im = im.convert("L" if c == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    pixels = np.asarray(im)
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def read(path, shape, error=UsageError):
    """Image file `path` (PNG, JPEG, anything Pillow reads) as uint8 (C, H, W) of `shape`; a file
    that is not an image: `error`, one line naming it."""
    from PIL import Image
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise error(f"{path}: a model for {dims(shape)} images takes no image files (one or "
                    f"three channels)")
    try:
        with Image.open(path) as im:
            return convert(im, shape)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise error(f"{path}: not an image ({one_line(e)})") from None

