"""Uploaded bytes -> an upright RGB image, with the same conversions as ``probe.data.load_image`` (EXIF
orientation, first frame of animations, 16-bit scaled, alpha over white) and the service's own pixel limit, on the
source and on every image the backbone's preprocessing would make of it (``footprint``).

Example:
    >>> img = decode_upload(open("cat.jpg", "rb").read(), max_pixels=40_000_000)
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from ..data import FootprintFn, ResizeTooLarge, TooManyPixels, decode
from .errors import BadImage, NotAnImage, TooLarge


def decode_upload(data: bytes, max_pixels: int, draft: int | None = None,
                  footprint: FootprintFn | None = None) -> Image.Image:
    """Decode an uploaded file to RGB, or raise: BadImage (empty, truncated, corrupt), NotAnImage (unknown
    format), TooLarge (more than ``max_pixels`` pixels, or a ``footprint`` -- the largest image the preprocessing
    makes of it, ``probe.transforms.Footprint`` -- above that: refused before the pixels are decoded)."""
    if not data:
        raise BadImage("the upload is empty (0 bytes): expected an image file (JPEG, PNG, WebP, …)")
    try:
        return decode(io.BytesIO(data), max_pixels, draft, footprint)
    except ResizeTooLarge as e:
        rw, rh = e.resized
        raise TooLarge(f"the image is {e.width}x{e.height} pixels, which the backbone's preprocessing would resize "
                       f"to {rw}x{rh} = {rw * rh} pixels; this server accepts at most {max_pixels} (--max-pixels) "
                       f"in any image it makes: an aspect ratio of {e.ratio:.0f}:1 is too extreme to embed") from None
    except TooManyPixels as e:
        raise TooLarge(f"the image is {e.width}x{e.height} = {e.width * e.height} pixels; this server accepts at "
                       f"most {max_pixels} (--max-pixels)") from None
    except (TooLarge, BadImage):
        raise
    except UnidentifiedImageError:
        raise NotAnImage(f"the upload is not an image: Pillow cannot identify the format of its {len(data)} bytes "
                         f"(starting {data[:8]!r}); send a JPEG, PNG, WebP, GIF, BMP or TIFF file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"the image is a decompression bomb: {e}") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types; a bad upload must be a 4xx, never a 500
        raise BadImage(f"the image cannot be decoded (corrupt or truncated): {type(e).__name__}: {e}") from None
