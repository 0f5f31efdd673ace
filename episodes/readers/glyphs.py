"""Noto glyph rendering for the embedded ``noto`` source: which letters, and how each instance looks.

Kept apart from the Source class so the pixels (everything in the cache key) live in one place.
Rendering is deterministic: every instance's font, axes and jitter come from seeds fixed by its
code point and instance number.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import math
import threading
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from episodes.split import Split

__all__ = ["NOTO_SCRIPTS", "RENDER_LOCK", "SEED", "VERSION", "RenderParams", "Script", "class_name", "library_versions",
           "render_all", "select_classes"]

log = logging.getLogger(__name__)

VERSION = "noto-glyphs-2"  # bump when rendering changes: it is part of the cache key
SEED = 20_240_601  # root of every per-class / per-instance seed
RENDER_LOCK = threading.Lock()  # the cached font objects carry their variation state


@dataclass(frozen=True)
class Script:
    split: Split
    fonts: tuple[str, ...]  # keys of _FONT_FILES
    ranges: tuple[tuple[int, int], ...]  # inclusive code point ranges to take letters from


_FONT_FILES: dict[str, tuple[str, str]] = {
    "sans": ("fontpkg_noto_sans", "NotoSans[wdth,wght].ttf"),
    "sans-italic": ("fontpkg_noto_sans", "NotoSans-Italic[wdth,wght].ttf"),
    "serif": ("fontpkg_noto_serif", "NotoSerif[wdth,wght].ttf"),
    "serif-italic": ("fontpkg_noto_serif", "NotoSerif-Italic[wdth,wght].ttf"),
    "display": ("fontpkg_noto_sans_display", "NotoSansDisplay[wdth,wght].ttf"),
    "display-italic": ("fontpkg_noto_sans_display", "NotoSansDisplay-Italic[wdth,wght].ttf"),
    "arabic": ("fontpkg_noto_sans_arabic", "NotoSansArabic[wdth,wght].ttf"),
    "kufi": ("fontpkg_noto_kufi_arabic", "NotoKufiArabic[wght].ttf"),
    "devanagari": ("fontpkg_noto_sans_devanagari", "NotoSansDevanagari[wdth,wght].ttf"),
    "khmer": ("fontpkg_noto_sans_khmer", "NotoSansKhmer[wdth,wght].ttf"),
    "tamil": ("fontpkg_noto_sans_tamil", "NotoSansTamil[wdth,wght].ttf"),
    "telugu": ("fontpkg_noto_sans_telugu", "NotoSansTelugu[wdth,wght].ttf"),
    "thai": ("fontpkg_noto_sans_thai", "NotoSansThai[wdth,wght].ttf"),
}
_LGC = ("sans", "sans-italic", "serif", "serif-italic", "display", "display-italic")

# Class-id order. Splits are by script, like Omniglot's by alphabet: the training scripts span
# Latin/Cyrillic, Arabic, two Brahmic abugidas and Thai; Telugu (a Brahmic script whose shapes
# differ from Devanagari's) validates; the test scripts are one script close to the training
# ones in style (Greek, near Latin/Cyrillic) and two unseen ones (Khmer, Tamil). The order is
# also the homoglyph order: a glyph identical to one of an earlier script is dropped, so test
# scripts never repeat a training letter (Greek capital Alpha is Latin A).
NOTO_SCRIPTS: dict[str, Script] = {
    "latin": Script(Split.TRAIN, _LGC, ((0x0041, 0x017F),)),  # Basic Latin .. Latin Extended-A
    "cyrillic": Script(Split.TRAIN, _LGC, ((0x0400, 0x04FF),)),
    "arabic": Script(Split.TRAIN, ("arabic", "kufi"), ((0x0620, 0x06FF),)),
    "devanagari": Script(Split.TRAIN, ("devanagari",), ((0x0900, 0x097F),)),
    "thai": Script(Split.TRAIN, ("thai",), ((0x0E00, 0x0E7F),)),
    "telugu": Script(Split.VALID, ("telugu",), ((0x0C00, 0x0C7F),)),
    "greek": Script(Split.TEST, _LGC, ((0x0370, 0x03E1), (0x03F0, 0x03FF))),  # without Coptic
    "khmer": Script(Split.TEST, ("khmer",), ((0x1780, 0x17FF),)),
    "tamil": Script(Split.TEST, ("tamil",), ((0x0B80, 0x0BFF),)),
}


@dataclass(frozen=True)
class RenderParams:
    """Everything that decides the pixels; all of it goes into the cache key."""

    size: int = 84
    font_size: int = 38  # fixed, with a fixed baseline: 'o' and 'O' differ by size, as on paper
    baseline: int = 53
    # Axis values come from small grids: FreeType re-instances a large variable font in ~8 ms,
    # so instances are rendered grouped by (font, weight, width).
    weights: tuple[float, ...] = (250.0, 350.0, 450.0, 550.0, 650.0, 750.0, 850.0)
    widths: tuple[float, ...] = (75.0, 87.5, 100.0)
    max_rotation: float = 10.0  # degrees
    scale: tuple[float, float] = (0.9, 1.1)
    max_shift: float = 3.0  # pixels
    homoglyph_iou: float = 0.97  # canonical renders this similar count as the same glyph


@dataclass(frozen=True)
class _Jitter:
    angle: float  # degrees
    scale: float
    shift: tuple[float, float]  # pixels


# -- fonts and letters -------------------------------------------------------------------------
def _font_path(key: str) -> Path:
    package, filename = _FONT_FILES[key]
    try:
        folder = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"noto: the font package {package.replace('_', '-')} is not installed; install metabench's dependencies."
        ) from None
    return Path(str(folder / "files" / filename))


@lru_cache(maxsize=None)
def _font(key: str, size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(_font_path(key)), size, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=None)
def _cmap(key: str) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(str(_font_path(key)), lazy=True) as font:
        return frozenset(font.getBestCmap())


def _candidates(script: Script) -> list[int]:
    """Base letters (Lu/Ll/Lo without any decomposition) that every font of the script covers."""
    cmaps = [_cmap(k) for k in script.fonts]
    return [
        cp
        for lo, hi in script.ranges
        for cp in range(lo, hi + 1)
        if unicodedata.category(chr(cp)) in ("Lu", "Ll", "Lo")
        and not unicodedata.decomposition(chr(cp))
        and all(cp in m for m in cmaps)
    ]


def _set_axes(font: Any, weight: float, width: float) -> None:
    values = []
    for axis in font.get_variation_axes():
        wanted = {b"Weight": weight, b"Width": width}.get(axis["name"], axis["default"])
        values.append(min(max(wanted, axis["minimum"]), axis["maximum"]))
    font.set_variation_by_axes(values)


def _draw(char: str, font: Any, p: RenderParams, jitter: _Jitter | None = None) -> np.ndarray:
    """Black glyph on white on the fixed baseline, its ink centred horizontally, then jittered.

    Without jitter (the canonical form used to find homoglyphs) the centring shift is a whole
    number of pixels, so identical outlines give identical pixels.
    """
    from PIL import Image, ImageDraw

    img = Image.new("L", (p.size, p.size), 255)
    x0, _, x1, _ = font.getbbox(char, anchor="ls")  # advance-based: only roughly centred
    ImageDraw.Draw(img).text((p.size / 2 - (x0 + x1) / 2, p.baseline), char, font=font, fill=0, anchor="ls")
    cols = np.flatnonzero(np.asarray(img).min(0) < 255)
    dx = p.size / 2 - (cols[0] + cols[-1] + 1) / 2 if cols.size else 0.0
    if jitter is None:
        affine, resample = (1.0, 0.0, -float(round(dx)), 0.0, 1.0, 0.0), Image.Resampling.NEAREST
    else:
        affine, resample = _inverse_affine(p, jitter, dx), Image.Resampling.BILINEAR
    img = img.transform(img.size, Image.Transform.AFFINE, affine, resample, fillcolor=255)
    return np.asarray(img, dtype=np.uint8)


def _inverse_affine(p: RenderParams, jitter: _Jitter, dx: float) -> tuple[float, ...]:
    """Output->input coefficients (what PIL wants) of: shift by dx, rotate and scale about the centre c, shift by t.

    Forward: p_out = s R (p_in + (dx, 0) - c) + c + t, so p_in = R^T (p_out - c - t) / s + c - (dx, 0).
    """
    a = math.radians(jitter.angle)
    cos, sin = math.cos(a) / jitter.scale, math.sin(a) / jitter.scale
    c = p.size / 2
    ox, oy = c + jitter.shift[0], c + jitter.shift[1]
    return (cos, sin, c - dx - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy)


# -- class selection and rendering -------------------------------------------------------------
def select_classes(scripts: Sequence[str], p: RenderParams) -> list[tuple[str, int]]:
    """(script, code point) classes of ``scripts``, with blank glyphs and homoglyphs dropped.

    Every script before the last requested one is checked too, so a script's letters never
    depend on which other scripts were asked for.
    """
    last = max(list(NOTO_SCRIPTS).index(s) for s in scripts)
    kept: list[tuple[str, int]] = []
    masks = np.zeros((sum(len(_candidates(s)) for s in NOTO_SCRIPTS.values()), p.size * p.size), dtype=np.float32)
    areas = np.zeros(len(masks), dtype=np.float32)
    for name in list(NOTO_SCRIPTS)[: last + 1]:
        script = NOTO_SCRIPTS[name]
        font = _font(script.fonts[0], p.font_size)
        _set_axes(font, 400.0, 100.0)
        for cp in _candidates(script):
            m = (_draw(chr(cp), font, p) < 128).reshape(-1).astype(np.float32)
            area = m.sum()
            if area == 0:
                log.debug("noto: %s U+%04X renders blank; skipped", name, cp)
                continue
            n = len(kept)
            inter = masks[:n] @ m
            if n and (inter / (areas[:n] + area - inter)).max() >= p.homoglyph_iou:
                continue  # a homoglyph of an earlier letter
            masks[n], areas[n] = m, area
            kept.append((name, cp))
    wanted = set(scripts)
    return [c for c in kept if c[0] in wanted]


@dataclass(frozen=True)
class _Instance:
    row: int  # position in the stored array
    char: str
    font: str
    weight: float
    width: float
    jitter: _Jitter


def _plan(classes: Sequence[tuple[str, int]], instances: int, p: RenderParams) -> list[_Instance]:
    """Parameters of every image, drawn from seeds fixed per (code point, instance).

    Fonts are cycled over instances, then the storage order of a class is shuffled once so that
    which images an episode takes never follows the font cycle.
    """
    plan = []
    for ci, (script, cp) in enumerate(classes):
        fonts = NOTO_SCRIPTS[script].fonts
        order = np.random.default_rng([SEED, cp]).permutation(instances)
        for j, i in enumerate(order.tolist()):
            rng = np.random.default_rng([SEED, cp, i])
            weight = p.weights[rng.integers(len(p.weights))]
            width = p.widths[rng.integers(len(p.widths))]
            angle = float(rng.uniform(-p.max_rotation, p.max_rotation))
            scale = float(rng.uniform(*p.scale))
            tx, ty = rng.uniform(-p.max_shift, p.max_shift, size=2).tolist()
            jitter = _Jitter(angle, scale, (tx, ty))
            plan.append(_Instance(ci * instances + j, chr(cp), fonts[i % len(fonts)], weight, width, jitter))
    return plan


def render_all(classes: Sequence[tuple[str, int]], instances: int, p: RenderParams) -> np.ndarray:
    """Greyscale ``[classes * instances, size, size]``, class-major, setting each font variation once."""
    images = np.empty((len(classes) * instances, p.size, p.size), dtype=np.uint8)
    plan = sorted(_plan(classes, instances, p), key=lambda t: (t.font, t.weight, t.width, t.row))
    current = None
    for inst in plan:
        font = _font(inst.font, p.font_size)
        if current != (inst.font, inst.weight, inst.width):
            _set_axes(font, inst.weight, inst.width)
            current = (inst.font, inst.weight, inst.width)
        images[inst.row] = _draw(inst.char, font, p, inst.jitter)
    return images


def class_name(script: str, cp: int) -> str:
    return f"{script}/{unicodedata.name(chr(cp), f'U+{cp:04X}')}"


def library_versions() -> dict[str, str]:
    import PIL
    from PIL import features

    versions = {"pillow": PIL.__version__, "freetype": str(features.version("freetype2"))}
    for package, _ in sorted(set(_FONT_FILES.values())):
        versions[package] = importlib.metadata.version(package.replace("_", "-"))
    return versions
