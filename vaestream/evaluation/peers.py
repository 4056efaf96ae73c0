"""The codecs people use, as rate-distortion peers: JPEG, WebP, AVIF and JPEG XL through Pillow.

Each is swept over its quality setting, **per image** (one file per picture: what a record store of
separate images pays) and **tiled** (up to :data:`TILE` pictures in one mosaic of :data:`TILE_COLS`
columns: headers amortised and the codec's context shared, the best case for it), optionally coded at
1/``factor`` resolution (Lanczos down, bicubic up), which reaches rates no quality setting does.
AVIF is Pillow's own (Pillow >= 11.3 with libavif); JPEG XL needs the ``pillow-jxl-plugin`` package
(``pip install pillow-jxl-plugin``); a codec that is not available is reported by :func:`available`.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from vaestream.metrics import psnr_db, ssim

TILE = 1000
TILE_COLS = 40

QUALITIES = {
    "JPEG": (1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "WEBP": (0, 1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100),
    "AVIF": (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
    "JXL": (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
}
OPTIONS = {"WEBP": {"method": 6}, "AVIF": {"speed": 4}, "JXL": {"effort": 7}}


def available() -> dict[str, bool]:
    """Which of :data:`QUALITIES`' formats this Pillow can write (JXL after ``import pillow_jxl``)."""
    from PIL import Image, features

    try:
        import pillow_jxl  # noqa: F401  (registers the JXL format)
    except ImportError:
        pass
    Image.init()
    return {"JPEG": True, "WEBP": bool(features.check("webp")), "AVIF": bool(features.check("avif")),
            "JXL": "JXL" in Image.SAVE}


def tile(images: np.ndarray) -> np.ndarray:
    """``[n, h, w]`` uint8 (n <= TILE) -> one picture of ``ceil(n / TILE_COLS)`` x ``TILE_COLS`` cells (the last
    row padded with black cells)."""
    n, h, w = images.shape
    rows = -(-n // TILE_COLS)
    cells = np.zeros((rows * TILE_COLS, h, w), images.dtype)
    cells[:n] = images
    return cells.reshape(rows, TILE_COLS, h, w).transpose(0, 2, 1, 3).reshape(rows * h, TILE_COLS * w)


def untile(picture: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    """The first ``n`` cells of a :func:`tile` picture, ``[n, h, w]``."""
    rows = picture.shape[0] // h
    return picture.reshape(rows, h, TILE_COLS, w).transpose(0, 2, 1, 3).reshape(rows * TILE_COLS, h, w)[:n]


def pil_encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def pil_decode(blob: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(blob)).convert("L"))


def _down_up(picture: np.ndarray, fmt: str, factor: int, **kw) -> tuple[int, np.ndarray]:
    """Encode ``picture`` at 1/factor resolution (Lanczos), decode, scale back (bicubic): (bytes, picture)."""
    from PIL import Image

    if factor == 1:
        blob = pil_encode(picture, fmt, **kw)
        return len(blob), pil_decode(blob)
    h, w = picture.shape
    small = np.asarray(Image.fromarray(picture).resize((w // factor, h // factor), Image.LANCZOS))
    blob = pil_encode(small, fmt, **kw)
    return len(blob), np.asarray(Image.fromarray(pil_decode(blob)).resize((w, h), Image.BICUBIC))


def lossy_curve(images: np.ndarray, fmt: str, qualities: Sequence[int] | None = None, tiled: bool = False,
                factor: int = 1, with_ssim: bool = True) -> list[dict]:
    """Bits per image, MSE, PSNR (and SSIM) of a Pillow codec over its quality settings.

    ``images``: ``[n, h, w]`` uint8 grey pictures. Returns one ``{"quality", "bits_per_image", "mse",
    "psnr_db", "ssim"}`` per setting (bits: every byte of every file)."""
    n, h, w = images.shape
    ref = images.astype(np.float64) / 255
    rows = []
    for q in (qualities or QUALITIES[fmt]):
        kw = {"quality": int(q), **OPTIONS.get(fmt, {})}
        if tiled:
            nbytes, rec = 0, []
            for s in range(0, n, TILE):
                part = images[s:s + TILE]
                size, pic = _down_up(tile(part), fmt, factor, **kw)
                nbytes += size
                rec.append(untile(pic, len(part), h, w))
            rec = np.concatenate(rec)
        else:
            nbytes, rec = 0, []
            for im in images:
                size, pic = _down_up(im, fmt, factor, **kw)
                nbytes += size
                rec.append(pic)
            rec = np.stack(rec)
        x = rec.astype(np.float64) / 255
        mse = float(np.mean((x - ref) ** 2))
        row = {"quality": int(q), "bits_per_image": 8 * nbytes / n, "mse": mse, "psnr_db": psnr_db(mse)}
        if with_ssim:
            row["ssim"] = ssim(x, ref)
        rows.append(row)
    return rows
