"""Request bodies to images: every malformed input becomes a :class:`RequestError` with a status and one line.

Accepted bodies: raw ``image/png``, ``image/jpeg`` or ``application/x-npy``
(one image, or for ``.npy`` a batch ``(N, C, H, W)``), or JSON
``{"images": ["<base64 PNG/JPEG/npy>", ...]}``. Statuses: 400 undecodable
(truncated image, bad base64 or JSON, JSON nested too deeply), 413 too large
(body, image count, pixels), 415 unsupported content type or an image whose
format is not the declared one (PIL opens only PNG under ``image/png`` and
only JPEG under ``image/jpeg``: a GIF, TIFF, WEBP or BMP is never parsed),
422 decodable but unusable (no images, wrong shape, NaN, values outside
[0, 1]). Messages never quote the body; an unforeseen decoder exception is
still a 400 (the body is the only input), never a 5xx.

Shape: decode(...) -> (N, C, H, W) float32 in [0, 1]
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

import numpy as np
from PIL import Image

from adv.errors import AdvError
from adv.serving.config import Limits

IMAGE_TYPES = ("image/png", "image/jpeg")
CONTENT_TYPES = (*IMAGE_TYPES, "application/x-npy", "application/json")
_MAGIC = {b"\x89PNG": "png", b"\xff\xd8": "jpeg", b"\x93NUMPY": "npy"}
#: The one PIL plugin each image kind may use: nothing else is ever parsed (``Image.open(formats=...)``).
_PIL_FORMATS = {"png": ("PNG",), "jpeg": ("JPEG",)}
#: ``{"images": [...]}`` needs two containers; anything far beyond is a nesting attack, refused unparsed.
MAX_JSON_CONTAINERS = 64


class RequestError(AdvError):
    """A client error: ``status`` (4xx) and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def media_type(content_type: str | None) -> str:
    """``image/png; charset=x`` -> ``image/png``; 415 for anything not accepted."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise RequestError(415, f"unsupported content type {kind[:60] or '(none)'!r}; send one of "
                                f"{', '.join(CONTENT_TYPES)}")
    return kind


def decode(body: bytes, content_type: str | None, shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    """The images of one request body, checked against the model's input ``shape`` (C, H, W)."""
    try:
        return _decode(body, content_type, shape, limits)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "JSON nested too deeply") from None
    except Exception as e:  # noqa: BLE001  anything else a decoder raises still comes from the body alone
        raise RequestError(400, f"cannot decode the request body ({type(e).__name__})") from None


def _decode(body: bytes, content_type: str | None, shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    kind = media_type(content_type)
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}")
    if not body:
        raise RequestError(400, "empty body")
    if kind == "application/json":
        parts = [_one(raw, _sniff(raw, i), shape, limits) for i, raw in enumerate(_json_images(body, limits))]
        if not parts:
            raise RequestError(422, "no images in the request")
        x = np.concatenate(parts)
    else:
        x = _one(body, {"image/png": "png", "image/jpeg": "jpeg"}.get(kind, "npy"), shape, limits)
    if len(x) > limits.max_images:
        raise RequestError(413, f"{len(x)} images exceed the limit of {limits.max_images} per request")
    if len(x) == 0:
        raise RequestError(422, "no images in the request")
    return x


def _json_images(body: bytes, limits: Limits) -> list[bytes]:
    if body.count(b"[") + body.count(b"{") > MAX_JSON_CONTAINERS:  # cheap guard before any parsing
        raise RequestError(400, f"JSON with more than {MAX_JSON_CONTAINERS} arrays or objects")
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError(400, "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "body is not valid JSON") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
        raise RequestError(422, 'JSON body must be {"images": ["<base64>", ...]}')
    if len(images) > limits.max_images:
        raise RequestError(413, f"{len(images)} images exceed the limit of {limits.max_images} per request")
    out = []
    for i, s in enumerate(images):
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"images[{i}] is not valid base64") from None
    return out


def _sniff(raw: bytes, i: int) -> str:
    for magic, kind in _MAGIC.items():
        if raw.startswith(magic):
            return kind
    raise RequestError(415, f"images[{i}] is neither PNG, JPEG nor .npy")


def _one(raw: bytes, kind: str, shape: tuple[int, int, int], limits: Limits) -> np.ndarray:
    x = _npy(raw, limits) if kind == "npy" else _picture(raw, kind, shape[0], limits)
    return _check_shape(x, shape)


def _picture(raw: bytes, kind: str, channels: int, limits: Limits) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(raw), formats=_PIL_FORMATS[kind])
            except Image.UnidentifiedImageError:
                raise RequestError(*_foreign(raw, kind)) from None
            w, h = im.size  # read from the header: nothing decoded yet
            if w * h > limits.max_pixels:
                raise RequestError(413, f"image of {w}x{h} pixels exceeds the limit of {limits.max_pixels}")
            im.load()
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, "image exceeds the decompression limit") from None
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError...) on broken files
        raise RequestError(400, f"cannot decode the image ({type(e).__name__})") from None
    im = im.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return (arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]).copy()


#: Other image formats, told by their first bytes (never by a PIL plugin, which would parse them).
_FOREIGN = ((b"GIF8", "GIF"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"), (b"BM", "BMP"), (b"\0\0\1\0", "ICO"),
            (b"RIFF", "WEBP"), (b"8BPS", "PSD"), (b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"))


def _foreign(raw: bytes, kind: str) -> tuple[int, str]:
    """415 when the bytes are an image of another format (GIF, TIFF, WEBP, BMP...), else 400 (broken)."""
    other = next((name for magic, name in _FOREIGN if raw.startswith(magic)), None)
    if other is None or other.lower() == kind:
        return 400, f"cannot decode the image (not a valid {kind.upper()})"
    return 415, f"a {other} image sent as image/{kind}; send PNG as image/png or JPEG as image/jpeg"


def _npy(raw: bytes, limits: Limits) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:  # truncated header or data, pickled objects: never unpickle a client's bytes
        raise RequestError(400, f"cannot read the .npy payload ({type(e).__name__})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "uif" or arr.dtype.itemsize > 8:
        raise RequestError(422, f".npy dtype must be uint8 or float, got {getattr(arr, 'dtype', '?')}")
    if arr.size > limits.max_pixels * limits.max_images * 4:
        raise RequestError(413, f".npy payload of {arr.size} values is too large")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype.kind in "iu":
        raise RequestError(422, f".npy integers must be uint8 (0-255), got {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise RequestError(422, ".npy payload contains NaN or infinite values")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise RequestError(422, "float images must lie in [0, 1]")
    return arr


def _check_shape(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    if x.ndim == 2 and c == 1:
        x = x[None, None]
    elif x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise RequestError(422, f"expected images of shape ({c}, {h}, {w}) (or a batch (N, {c}, {h}, {w})), "
                                f"got {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)
