"""The embedded default data set ("glyphs"): rendered Unicode letters, one class per character.

Why this exists
---------------
arcfold needs a retrieval data set that is always available (no internet, no Kaggle download), small,
deterministic and yet not trivial, so the whole pipeline (folds, training, OOF embeddings, Recall@K)
can be exercised and *measured* anywhere.  ``glyphs`` is that data set: every class is one letter of
one script, every group (super-class) is a script.

What is generated
-----------------
* **Scripts / groups**, in this fixed order (earlier scripts win look-alike ties): Latin, Greek,
  Cyrillic, Armenian, Georgian (Mkhedruli), Hebrew, Arabic, Lao, N'Ko, Tifinagh, Ogham, Canadian
  Syllabics.  Bicameral scripts contribute lowercase letters only, so ``o``/``O`` never become two
  classes that differ only in size (which the scale jitter would make indistinguishable).  Arabic
  letters are drawn one code point at a time, i.e. in their isolated form.  Hebrew includes the final
  forms; the confusable filter drops those too close to another letter (final nun looks like vav).
  Canadian Syllabics contribute only the plain ``CANADIAN SYLLABICS <SYLLABLE>`` letters.
* **Fonts**: only the fonts matplotlib ships (``matplotlib/mpl-data/fonts/ttf``): DejaVu
  Sans/Serif/Sans Mono in all styles, STIXGeneral in all styles and the Computer Modern text fonts
  (``cmr10``, ``cmb10``, ``cmss10``, ``cmti10``, ``cmtt10``, ``cmmi10``).  Never used:
  ``LastResortHE-Regular.ttf`` (every code point maps to a placeholder box), the STIX size variants and
  ``STIXNonUni*`` (no letters at their code points) and ``cmex10``/``cmsy10`` (their cmaps claim ASCII
  letters but hold delimiters and math symbols).  A font is used for a character only if its cmap maps
  the code point to a non-zero glyph index *and* the rendered glyph has ink.  Every class is rendered
  with every covering font (minus the styles removed below); characters with fewer than
  :data:`MIN_FONTS` fonts are dropped.
* **Confusables are removed automatically**, in one greedy pass over the candidates in the fixed
  order (so Latin keeps ``o`` and the Greek, Cyrillic and Armenian look-alikes go):

  1. Every candidate is rendered *canonically* in every font that covers it: fixed pixel size, bounding
     box centred on a 96 px canvas, oversize glyphs fitted -- exactly the geometry of the data, without
     augmentation -- and additionally enlarged by 1.15 and 1.3 (the data's scale jitter of +-15 % can
     make two glyphs whose sizes differ by up to ~1.3x the same size).
  2. A cheap prefilter (correlation of blurred 24 px versions, max over the relative scales) keeps the
     pairs with correlation >= 0.95 in a shared font.
  3. For those, the *unmatched ink* is measured: the number of ink pixels of either glyph farther than
     1.5 px from any ink of the other, minimised over shifts of +-1 px, the relative scales and one
     glyph or the other made 1 px bolder (the data's stroke jitter).  Identical outlines score 0,
     letters that differ by a dot, a bar or a hook score >= 12 (ب/ت 24, i/l 12, е/ё 14, и/й 16).
  4. A candidate that scores <= :data:`CONFUSABLE_MAX_UNMATCHED` (8 px) against an already-kept character
     in a *reference font* (DejaVu Sans or DejaVu Serif, the regular upright designs) is a homoglyph
     and dropped.  A match only in other styles removes just those styles from the candidate: DejaVu
     Serif Italic and STIX Italic draw Cyrillic ``т`` and ``и`` in their cursive forms, which look like
     Latin ``m`` and ``u``, so those two classes are rendered without the italic serif fonts.
  5. A small hand list (:data:`HAND_CONFUSABLES`) is the safety net for look-alikes the pixel measure
     scores like a missing dot: ``p``/``ρ`` (stem top only), and shape twins that differ in proportion
     (two plus signs: Tifinagh yat / Ogham ailm).

  The threshold was chosen by reading the ranked pairs (``python -m arcfold.datasets.glyphs
  --list-confusables 30``, :func:`find_confusable_pairs`): scores 0-4 are true homoglyphs (a/а, o/ο/о/օ,
  p/р, x/х, u/ս, l/ا/ו/ן/ߊ/ⵏ, n/ח, γ/ү), 8 is ``r``/``г`` in DejaVu Serif (differ only in the arm's
  terminal; dropped), and from 12 on the pairs are distinct letters (i/l, n/п, и/й).
* **Balance**: a script stops taking letters once it has :data:`MAX_PER_GROUP`; inside a script the
  candidates are visited basic letters first and, within a Unicode block, in bit-reversed order, so
  the cap keeps letters spread over the whole block (deterministic, independent of the seed).
* **Per image variation** (each image has its own ``numpy.random.default_rng((seed, codepoint,
  image_index))`` -- the code point rather than the class index, so regeneration is byte-identical and
  independent of processing order and of which other classes exist): font among the covering fonts;
  stroke weight (erosion by 1 px or dilation by 1-2 px at 2x resolution; bold styles are never dilated);
  affine with rotation +-15 deg, scale 0.85-1.15, aspect 0.9-1.1, shear +-0.2 and a translation (up to
  +-10 %) that keeps the glyph inside the image; light background with random grey level, linear
  gradient and a low-frequency texture; ink intensity (>= 80 grey levels of contrast); a faint
  distractor line in 30 % of the images; Gaussian blur and additive noise.  Polarity is always **dark
  ink on a light background**: the data set is about shape, and random inversion would mostly test
  contrast invariance.
* Output is grayscale PNG, ``image_size`` square (default 64), written atomically as a whole
  directory (generated beside ``out_dir`` then renamed into place).  With the defaults: 306 classes
  in 12 groups (23-26 per group), 16 images per class, 12-20 s on 2 CPU cores (about 5 s of it choosing
  the classes).  Leave-one-out 1-NN on raw 16x16 pixels reaches Recall@1 of about 0.2 (chance 0.003):
  far from trivial, far from noise.

Layout of ``out_dir``: ``train.csv`` (``image,label,group``; ``image`` relative to ``out_dir``),
``classes.csv`` (``label,group,char,codepoint,unicode_name,n_fonts,fonts``), ``README.md`` and
``images/<group>/<codepoint hex>_<index>.png``.

CLI: ``python -m arcfold.datasets.glyphs --out input/glyphs --seed 0 [--images-per-class 16] [--image-size 64]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from arcfold.io import file_lock

__all__ = [
    "CONFUSABLE_MAX_UNMATCHED",
    "DEFAULT_GLYPHS_DIR",
    "GlyphClass",
    "ensure_glyphs",
    "find_confusable_pairs",
    "font_dir",
    "generate_glyphs",
    "main",
    "select_classes",
]

log = logging.getLogger(__name__)

DEFAULT_GLYPHS_DIR = Path("input/glyphs")

#: Two glyphs are the same character when, in a shared font, neither has more than this many ink pixels
#: (on the 96 px canonical canvas) farther than the tolerance from the other's ink (see module docstring).
CONFUSABLE_MAX_UNMATCHED = 8.0
#: A character needs at least this many covering fonts, otherwise every image of the class is one design.
MIN_FONTS = 2
#: Cap per script so that no group dominates (with 12 scripts, at most ~8.5 % of the classes each).
MAX_PER_GROUP = 26
#: Fonts that must never be used, whatever their cmap claims.
EXCLUDED_FONT_PREFIXES = (
    "LastResort",
    "STIXSiz",
    "STIXNonUni",
    "cmex",
    "cmsy",
    "DejaVuSansDisplay",
    "DejaVuSerifDisplay",
)
#: Reference fonts for the canonical confusable comparison; every candidate must be in the first one.
REFERENCE_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf")
#: Safety net of known look-alikes: if the first code point is kept, the second is dropped even when the
#: pixel measure did not catch it (it catches all but the last four; checked by the tests).
HAND_CONFUSABLES: tuple[tuple[int, int], ...] = (
    (0x0061, 0x0430),  # a / Cyrillic a
    (0x0063, 0x0441),  # c / Cyrillic es
    (0x0065, 0x0435),  # e / Cyrillic ie
    (0x006F, 0x03BF),  # o / Greek omicron
    (0x006F, 0x043E),  # o / Cyrillic o
    (0x006F, 0x0585),  # o / Armenian oh
    (0x0070, 0x0440),  # p / Cyrillic er
    (0x0078, 0x0445),  # x / Cyrillic ha
    (0x0079, 0x0443),  # y / Cyrillic u
    (0x0073, 0x0455),  # s / Cyrillic dze
    (0x0069, 0x0456),  # i / Cyrillic byelorussian-ukrainian i
    (0x006A, 0x0458),  # j / Cyrillic je
    (0x0068, 0x04BB),  # h / Cyrillic shha
    (0x006C, 0x04CF),  # l / Cyrillic palochka
    (0x0259, 0x04D9),  # schwa / Cyrillic schwa
    (0x0075, 0x057D),  # u / Armenian seh
    (0x006E, 0x0578),  # n / Armenian vo
    (0x0070, 0x03C1),  # p / Greek rho (differs only by the stem's top in DejaVu)
    # shape twins that differ only in proportions, which the pixel measure scores like a missing dot
    (0x2D5C, 0x1690),  # Tifinagh yat / Ogham ailm: both a plus sign
    (0x05DA, 0x14A3),  # Hebrew final kaf / Canadian syllabics me
    (0x0647, 0x07CB),  # Arabic heh / N'Ko ee: a small loop
)

# Supersampling factor: glyphs are warped on a canvas this many times larger than the output, then
# area-downsampled, which anti-aliases the affine warp.
_SUPERSAMPLE = 2
# Font pixel size and maximal glyph extent, as fractions of the (supersampled) canvas side.
_FONT_FRACTION = 0.72
_MAX_EXTENT_FRACTION = 0.78
# Confusable comparison: canonical canvas side (pixels), relative scales tried (the data's scale jitter
# is +-15 %, so two glyphs whose sizes differ by up to ~1.3x can be drawn the same size), coarse
# prefilter (correlation of blurred 24 px versions; the expensive fine score is only computed above it),
# and the fine score's tolerance (pixels a contour may move: design and rasterisation differences) and
# shift search (pixels).
_CANON_SIDE = 96
_CANON_SCALES = (1.0, 1.15, 1.3)
_FINE_SCALE_PAIRS = ((0, 0), (0, 1), (1, 0), (0, 2), (2, 0))
_FINE_STROKE_PAIRS = ((0, 0), (1, 0), (0, 1))
_COARSE_SIDE = 24
_COARSE_MIN = 0.95
_FINE_TOLERANCE = 1.5
_FINE_SHIFT = 1

# (group, code points).  Order matters: earlier scripts win confusable ties.  The Latin extras only come
# in if MAX_PER_GROUP is raised above 26.
_LATIN_EXTRA = "ßæðþœŋəɛɔʃʒɣħɓɗ"
_SCRIPT_SPECS: tuple[tuple[str, tuple[tuple[int, int], ...], str], ...] = (
    # (group, inclusive code point ranges, kind): kind "lower" keeps Ll only, "letter" keeps Ll/Lo.
    ("latin", ((0x61, 0x7A),) + tuple((ord(c), ord(c)) for c in _LATIN_EXTRA), "lower"),
    ("greek", ((0x3B1, 0x3C9),), "lower"),
    ("cyrillic", ((0x430, 0x44F), (0x450, 0x45F), (0x490, 0x4FF)), "lower"),
    ("armenian", ((0x561, 0x586),), "lower"),
    ("georgian", ((0x10D0, 0x10F0),), "letter"),
    ("hebrew", ((0x5D0, 0x5EA),), "letter"),
    ("arabic", ((0x628, 0x63A), (0x641, 0x64A), (0x621, 0x627)), "letter"),
    ("lao", ((0xE81, 0xEAE),), "letter"),
    ("nko", ((0x7CA, 0x7EA),), "letter"),
    ("tifinagh", ((0x2D30, 0x2D67),), "letter"),
    ("ogham", ((0x1681, 0x169A),), "letter"),
    ("canadian", ((0x1401, 0x166C),), "syllable"),
)


@dataclass(frozen=True)
class GlyphClass:
    """One class of the data set: a character and the fonts that render it."""

    group: str
    codepoint: int
    fonts: tuple[str, ...] = field(default=())

    @property
    def char(self) -> str:
        return chr(self.codepoint)

    @property
    def hex(self) -> str:
        return f"{self.codepoint:04x}"

    @property
    def label(self) -> str:
        return f"{self.group}_{self.hex}"


# --------------------------------------------------------------------------------------------- fonts


def font_dir() -> Path:

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=1)
def _font_cmaps() -> dict[str, frozenset[int]]:
    """Usable font file name -> code points its cmap maps to a real (non-zero) glyph."""

    out: dict[str, frozenset[int]] = {}
    for path in sorted(font_dir().glob("*.ttf")):
        if path.name.startswith(EXCLUDED_FONT_PREFIXES):
            continue
        cmap = FT2Font(str(path)).get_charmap()
        out[path.name] = frozenset(cp for cp, gid in cmap.items() if gid)
    return out


@lru_cache(maxsize=64)
def _pil_font(name: str, px: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one code point is drawn as its nominal glyph (isolated Arabic form), and the
    # result does not depend on whether libraqm happens to be installed.
    return ImageFont.truetype(str(font_dir() / name), px, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=16384)
def _glyph_mask(char: str, font_name: str, px: int) -> np.ndarray | None:
    """Tight uint8 coverage mask of ``char`` at ``px`` pixels (cached, read-only); ``None`` if blank."""
    font = _pil_font(font_name, px)
    left, top, right, bottom = font.getbbox(char, anchor="ls")
    if right <= left or bottom <= top:
        return None
    img = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), char, font=font, fill=255, anchor="ls")
    arr = np.asarray(img, dtype=np.uint8)
    ys, xs = np.nonzero(arr > 64)
    # a few pixels of ink are a rendering artefact, not a letter
    if len(ys) < max(4, px // 8):
        return None
    arr = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
    arr.setflags(write=False)
    return arr


def _canvas_geometry(image_size: int) -> tuple[int, int, float]:
    """(canvas side, font px, max glyph extent) of the supersampled canvas."""
    side = image_size * _SUPERSAMPLE
    return side, max(8, round(side * _FONT_FRACTION)), side * _MAX_EXTENT_FRACTION


# ------------------------------------------------------------------------------------ class selection


def _spread_order(n: int) -> list[int]:
    """0..n-1 in bit-reversed (van der Corput) order: every prefix is spread evenly over the range."""
    bits = max(1, (n - 1).bit_length())
    order = [int(f"{k:0{bits}b}"[::-1], 2) for k in range(1 << bits)]
    return [i for i in order if i < n]


def _candidates() -> list[tuple[str, int]]:
    """(group, code point) in visiting order: scripts in :data:`_SCRIPT_SPECS` order, inside a script its
    ranges in order (basic letters before extensions), inside a range spread over the block, so that a
    per-group cap keeps letters from the whole block rather than its beginning."""
    seen: set[int] = set()
    out: list[tuple[str, int]] = []
    for group, ranges, kind in _SCRIPT_SPECS:
        for lo, hi in ranges:
            block = []
            for cp in range(lo, hi + 1):
                ch = chr(cp)
                cat = unicodedata.category(ch)
                if kind == "lower" and cat != "Ll":
                    continue
                if kind in ("letter", "syllable") and cat not in ("Ll", "Lo"):
                    continue
                # Canadian Syllabics: only the plain "CANADIAN SYLLABICS <SYLLABLE>" letters, not the
                # hundreds of regional/final variants.
                if kind == "syllable" and len(unicodedata.name(ch, "").split()) != 3:
                    continue
                if cp not in seen:
                    seen.add(cp)
                    block.append(cp)
            out += [(group, block[i]) for i in _spread_order(len(block))] if block else []
    return out


def _covering_fonts(char: str, px: int) -> tuple[str, ...]:
    cp = ord(char)
    return tuple(name for name, cps in _font_cmaps().items() if cp in cps and _glyph_mask(char, name, px) is not None)


def _place(mask: np.ndarray, matrix: np.ndarray, side: int) -> np.ndarray:
    return cv2.warpAffine(mask, matrix, (side, side), flags=cv2.INTER_LINEAR, borderValue=0.0)


def _centering_matrix(mask: np.ndarray, scale: float, side: int) -> np.ndarray:
    """Affine that scales ``mask`` about its centre and puts that centre at the canvas centre."""
    h, w = mask.shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    c = (side - 1) / 2.0
    return np.array([[scale, 0.0, c - scale * cx], [0.0, scale, c - scale * cy]], dtype=np.float64)


def _canonical(char: str, font_name: str) -> np.ndarray | None:
    """Canonical coverage images [len(_CANON_SCALES), side, side] of ``char``: same geometry as the data
    (fixed font size, bounding box centred, oversize glyphs fitted) without augmentation."""
    side, px, max_extent = _canvas_geometry(_CANON_SIDE // _SUPERSAMPLE)
    mask = _glyph_mask(char, font_name, px) if ord(char) in _font_cmaps()[font_name] else None
    if mask is None:
        return None
    mask = mask.astype(np.float32) / 255.0
    fit = min(1.0, max_extent / max(mask.shape))
    return np.stack([_place(mask, _centering_matrix(mask, fit * s, side), side) for s in _CANON_SCALES])


def _coarse_vectors(stack: np.ndarray) -> np.ndarray:
    """Blurred, downsampled, zero-mean unit vectors of a canonical stack (one per scale)."""
    out = []
    for img in stack:
        small = cv2.resize(img, (_COARSE_SIDE, _COARSE_SIDE), interpolation=cv2.INTER_AREA)
        v = cv2.GaussianBlur(small, (0, 0), 1.0).ravel()
        v = v - v.mean()
        out.append(v / (np.linalg.norm(v) + 1e-8))
    return np.stack(out)


_FineMaps = list[list[tuple[np.ndarray, np.ndarray]]]


def _fine_maps(stack: np.ndarray) -> _FineMaps:
    """[scale][stroke] -> (flat indices of the ink pixels, flat "far" map), both on the canvas padded by the
    shift range; far = 1 where a pixel is farther than the tolerance from any ink (and in the padding).
    Stroke 0 is the glyph as drawn, stroke 1 the glyph dilated by one pixel."""
    s = _FINE_SHIFT
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    out = []
    for img in stack:
        ink = (img > 0.5).astype(np.uint8)
        per_stroke = []
        for variant in (ink, cv2.dilate(ink, kernel)):
            far = (cv2.distanceTransform(1 - variant, cv2.DIST_L2, 3) > _FINE_TOLERANCE).astype(np.uint8)
            ink_pad = cv2.copyMakeBorder(variant, s, s, s, s, cv2.BORDER_CONSTANT, value=0)
            far_pad = cv2.copyMakeBorder(far, s, s, s, s, cv2.BORDER_CONSTANT, value=1)
            per_stroke.append((np.flatnonzero(ink_pad), far_pad.ravel()))  # sums of uint8 upcast to int
        out.append(per_stroke)
    return out


def _shift_offsets() -> np.ndarray:
    w = _CANON_SIDE + 2 * _FINE_SHIFT
    r = range(-_FINE_SHIFT, _FINE_SHIFT + 1)
    return np.array([dy * w + dx for dy in r for dx in r], dtype=np.int64)


def _fine_score(a: _FineMaps, b: _FineMaps, limit: float = math.inf) -> float:
    """Unmatched ink (pixels) between two canonical glyphs, minimised over small shifts, relative scales and
    stroke weights.

    With ``B`` shifted by ``t`` against ``A``, ``A`` leaves ``sum over A's ink of farB(x - t)`` pixels farther
    than the tolerance from any ink of ``B``, and ``B`` leaves ``sum over B's ink of farA(x + t)``; the score
    is the larger of the two, minimised over shifts, over the relative scales 1, 1.15 and 1.3 either way and
    over one glyph or the other made one pixel bolder (the data's scale and stroke jitter could make
    them so).  Identical outlines score 0; a dot, a bar or a hook that one glyph has and the other lacks
    scores tens of pixels.

    Only scores up to ``limit`` are exact; above it the result is just some value > ``limit`` (which
    lets the selection skip most of the work for clearly different glyphs).
    """
    offs = _shift_offsets()[:, None]
    best = math.inf
    for ka, kb in _FINE_SCALE_PAIRS:
        for va, vb in _FINE_STROKE_PAIRS:
            a_ink, a_far = a[ka][va]
            b_ink, b_far = b[kb][vb]
            ua = b_far[a_ink[None, :] - offs].sum(1)
            lower = float(ua.min())  # a lower bound of this combination's score
            if lower > limit:
                best = min(best, lower)
                continue
            if lower >= best:
                continue
            ub = a_far[b_ink[None, :] + offs].sum(1)
            best = min(best, float(np.maximum(ua, ub).min()))
            if best == 0:
                return 0.0
    return best


class _CanonCache:
    """Coarse vectors and (lazily, for the few pairs that pass the prefilter) fine maps of (character, font)
    pairs.  Canonical images are not kept: re-rendering one is cheaper than holding thousands."""

    def __init__(self) -> None:
        self.coarse: dict[tuple[str, str], np.ndarray] = {}
        self._fine: dict[tuple[str, str], _FineMaps] = {}

    def add(self, char: str, font_name: str) -> bool:
        """Register ``char`` in ``font_name``; False if the font does not render it."""
        key = (char, font_name)
        if key not in self.coarse:
            stack = _canonical(char, font_name)
            if stack is None:
                return False
            self.coarse[key] = _coarse_vectors(stack)
        return True

    def fine(self, a: str, b: str, font_name: str, limit: float = math.inf) -> float:
        for ch in (a, b):
            if (ch, font_name) not in self._fine:
                stack = _canonical(ch, font_name)
                if stack is None:
                    raise ValueError(f"{font_name} does not render {ch!r}")
                self._fine[(ch, font_name)] = _fine_maps(stack)
        return _fine_score(self._fine[(a, font_name)], self._fine[(b, font_name)], limit)


def find_confusable_pairs(max_unmatched: float = 40.0, fonts: Sequence[str] = REFERENCE_FONTS) -> pd.DataFrame:
    """All candidate pairs whose fine score in one of ``fonts`` is <= ``max_unmatched``, most similar first.

    This is the tool used to pick :data:`CONFUSABLE_MAX_UNMATCHED`: read the list and check that true
    homoglyphs rank below the threshold and letters that differ by a dot, a bar or a hook above it.
    """
    cache = _CanonCache()
    cands = _candidates()
    rows = []
    for font_name in fonts:
        chars = [chr(cp) for _, cp in cands if cache.add(chr(cp), font_name)]
        groups = {chr(cp): g for g, cp in cands}
        vecs = np.stack([cache.coarse[(c, font_name)] for c in chars])  # [n, scales, d]
        flat = vecs.reshape(-1, vecs.shape[-1])
        gram = (flat @ flat.T).reshape(len(chars), len(_CANON_SCALES), len(chars), len(_CANON_SCALES)).max((1, 3))
        for i, j in zip(*np.nonzero(np.triu(gram >= _COARSE_MIN, k=1)), strict=True):
            score = cache.fine(chars[i], chars[j], font_name, limit=max_unmatched)
            if score <= max_unmatched:
                a, b = chars[i], chars[j]
                rows.append(
                    {
                        "a": a,
                        "b": b,
                        "a_label": f"{groups[a]}_{ord(a):04x}",
                        "b_label": f"{groups[b]}_{ord(b):04x}",
                        "font": font_name,
                        "unmatched": score,
                        "coarse": float(gram[i, j]),
                        "a_name": unicodedata.name(a, ""),
                        "b_name": unicodedata.name(b, ""),
                    }
                )
    df = pd.DataFrame(rows, columns=["a", "b", "a_label", "b_label", "font", "unmatched", "coarse", "a_name", "b_name"])
    return df.sort_values(["unmatched", "a_label", "b_label"], kind="stable").reset_index(drop=True)


@dataclass
class Selection:
    """Result of :func:`select_classes` with the reasons for everything left out."""

    classes: list[GlyphClass]
    #: (dropped label, kept label it looks like, reference font, unmatched pixels; nan for hand-list drops)
    dropped_confusables: list[tuple[str, str, str, float]]
    #: (label, font removed from its fonts, kept label it looks like in that font)
    dropped_fonts: list[tuple[str, str, str]]
    dropped_few_fonts: list[str]
    dropped_by_cap: list[str]


@lru_cache(maxsize=4)
def select_classes(image_size: int = 64) -> Selection:
    """Candidates -> font coverage -> confusable filter -> per-group cap.  Independent of the seed.

    One greedy pass over :func:`_candidates` (fixed visiting order): a character is dropped if it looks the
    same as an already-kept one in a reference font; fonts in which it looks the same as a kept one are
    removed from it; a script stops taking letters once it has :data:`MAX_PER_GROUP`.

    Long because the selection is one greedy pass over the candidate classes; split, its state would have to travel
    between functions.
    """
    _, px, _ = _canvas_geometry(image_size)
    cache = _CanonCache()
    few: list[str] = []
    kept: list[GlyphClass] = []
    kept_cps: set[int] = set()
    per_group: dict[str, int] = {}
    capped: list[str] = []
    # per font: the kept characters drawn in it and their coarse vectors, for one matrix product per font
    font_chars: dict[str, list[GlyphClass]] = {}
    font_vecs: dict[str, np.ndarray] = {}  # [capacity, scales * d]; the first len(font_chars[f]) rows are used
    dropped: list[tuple[str, str, str, float]] = []
    dropped_fonts: list[tuple[str, str, str]] = []
    hand_drop: dict[int, list[int]] = {}
    for a, b in HAND_CONFUSABLES:
        hand_drop.setdefault(b, []).append(a)
    for group, cp in _candidates():
        ch = chr(cp)
        label = f"{group}_{cp:04x}"
        if per_group.get(group, 0) >= MAX_PER_GROUP:
            capped.append(label)
            continue
        # a font counts if it renders the glyph both at the data size and at the canonical size
        fonts = [f for f in _covering_fonts(ch, px) if cache.add(ch, f)]
        if len(fonts) < MIN_FONTS or REFERENCE_FONTS[0] not in fonts:
            few.append(label)
            continue
        # reference fonts first: a match there settles it
        order = [f for f in REFERENCE_FONTS if f in fonts] + [f for f in fonts if f not in REFERENCE_FONTS]
        verdict: tuple[str, str, float] | None = None
        bad_fonts: dict[str, str] = {}
        for f in order:
            if not font_chars.get(f):
                continue
            dim = cache.coarse[(ch, f)].shape[1]
            n_kept = len(font_chars[f])
            kept_vecs = font_vecs[f][:n_kept].reshape(-1, dim)  # [kept in f * scales, d]
            # einsum rather than @: for this skinny product it avoids BLAS threading overhead (3x faster)
            coarse = np.einsum("kd,sd->ks", kept_vecs, cache.coarse[(ch, f)]).reshape(n_kept, -1).max(1)
            for k in np.flatnonzero(coarse >= _COARSE_MIN):
                other = font_chars[f][k]
                score = cache.fine(other.char, ch, f, limit=CONFUSABLE_MAX_UNMATCHED)
                if score > CONFUSABLE_MAX_UNMATCHED:
                    continue
                if f in REFERENCE_FONTS:
                    verdict = (other.label, f, score)
                else:
                    bad_fonts.setdefault(f, other.label)
                break
            if verdict:
                break
        if verdict:
            # the same shape in a regular reference font: a homoglyph, the character goes
            dropped.append((label, *verdict))
            continue
        hand = [a for a in hand_drop.get(cp, []) if a in kept_cps]
        if hand:
            # safety net: a known homoglyph the measurement did not catch (p / Greek rho)
            dropped.append((label, next(k.label for k in kept if k.codepoint == hand[0]), "", float("nan")))
            continue
        if bad_fonts:
            # the same shape only in some styles (Cyrillic italic т looks like Latin m): drop those styles
            fonts = [f for f in fonts if f not in bad_fonts]
            dropped_fonts += [(label, f, lab) for f, lab in bad_fonts.items()]
            if len(fonts) < MIN_FONTS:
                few.append(label)
                continue
        gc = GlyphClass(group, cp, tuple(fonts))
        kept.append(gc)
        kept_cps.add(cp)
        per_group[group] = per_group.get(group, 0) + 1
        for f in fonts:
            v = cache.coarse[(ch, f)].ravel()
            rows = font_chars.setdefault(f, [])
            if f not in font_vecs or len(rows) == len(font_vecs[f]):  # grow by doubling
                grown = np.zeros((max(64, 2 * len(rows)), v.size), dtype=np.float32)
                grown[: len(rows)] = font_vecs[f][: len(rows)] if f in font_vecs else 0.0
                font_vecs[f] = grown
            font_vecs[f][len(rows)] = v
            rows.append(gc)

    order_of = {g: i for i, (g, _, _) in enumerate(_SCRIPT_SPECS)}
    classes = sorted(kept, key=lambda c: (order_of[c.group], c.codepoint))
    return Selection(classes, dropped, dropped_fonts, few, capped)


# -------------------------------------------------------------------------------------------- images


def render_image(gc: GlyphClass, seed: int, index: int, image_size: int = 64) -> np.ndarray:
    """One augmented uint8 grayscale image of class ``gc``; a pure function of its arguments."""
    rng = np.random.default_rng((seed, gc.codepoint, index))
    side, px, max_extent = _canvas_geometry(image_size)
    font_name = gc.fonts[int(rng.integers(len(gc.fonts)))]
    glyph = _glyph_mask(gc.char, font_name, px)
    if glyph is None:  # coverage is checked at selection time; a hand-made GlyphClass may be wrong
        raise ValueError(f"{font_name} does not render {gc.label}")
    mask = np.pad(glyph.astype(np.float32) / 255.0, 4)  # room for dilation

    # stroke weight, at 2x resolution: erode by 1 px or dilate by up to 2 px (1 output px); bold styles
    # are never dilated, or dense letters (Ogham, Georgian) close up into blobs
    bold = any(k in font_name for k in ("Bold", "Bol", "cmb"))
    stroke = int(rng.choice([-1, 0, 0] if bold else [-1, 0, 0, 1, 2, 2]))
    if stroke:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * abs(stroke) + 1, 2 * abs(stroke) + 1))
        mask = cv2.dilate(mask, kernel) if stroke > 0 else cv2.erode(mask, kernel)

    # affine: fit oversize glyphs, then scale / aspect / shear / rotation about the glyph centre
    h, w = mask.shape
    fit = min(1.0, max_extent / max(h, w))
    scale = fit * rng.uniform(0.85, 1.15)
    aspect = rng.uniform(0.9, 1.1)
    shear = rng.uniform(-0.2, 0.2)
    theta = math.radians(rng.uniform(-15.0, 15.0))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lin = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([scale * aspect, scale / aspect])
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], dtype=np.float64) - [(w - 1) / 2, (h - 1) / 2]
    moved = corners @ lin.T
    centre = (side - 1) / 2.0
    margin = 0.04 * side
    # translation range that keeps the transformed bounding box inside the canvas (up to +-10 %)
    shift = []
    for axis in range(2):
        lo = max(-0.1 * side, margin - centre - moved[:, axis].min())
        hi = min(0.1 * side, side - 1 - margin - centre - moved[:, axis].max())
        shift.append(rng.uniform(lo, hi) if lo < hi else (lo + hi) / 2)
    offset = np.array([centre + shift[0], centre + shift[1]]) - lin @ [(w - 1) / 2, (h - 1) / 2]
    ink = _place(mask, np.hstack([lin, offset[:, None]]), side)
    ink = cv2.resize(ink, (image_size, image_size), interpolation=cv2.INTER_AREA)

    # background: grey level + linear gradient + low-frequency texture
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(1, image_size - 1) - 0.5
    base = rng.uniform(160.0, 240.0)
    phi = rng.uniform(0, 2 * math.pi)
    bg = base + rng.uniform(0.0, 50.0) * (math.cos(phi) * xx + math.sin(phi) * yy)
    k = int(rng.integers(3, 9))
    texture = cv2.resize(
        rng.standard_normal((k, k)).astype(np.float32), (image_size, image_size), interpolation=cv2.INTER_CUBIC
    )
    bg = bg + rng.uniform(0.0, 15.0) * texture
    # ink: dark, with at least ~80 grey levels of contrast to the local background
    fg = rng.uniform(0.0, min(100.0, base - 80.0))

    # occasional faint distractor line (ruling, scratch), drawn under the ink
    if rng.random() < 0.3:
        line = np.zeros((image_size, image_size), dtype=np.float32)
        p0 = tuple(int(v) for v in rng.integers(0, image_size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, image_size, 2))
        cv2.line(line, p0, p1, 1.0, thickness=1, lineType=cv2.LINE_AA)
        bg = bg - rng.uniform(0.2, 0.45) * (base - fg) * line

    img = bg * (1.0 - ink) + fg * ink
    sigma = rng.uniform(0.0, 1.0)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0.0, rng.uniform(2.0, 12.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- writing


def _readme(sel: Selection, seed: int, images_per_class: int, image_size: int, n_images: int) -> str:
    groups = pd.Series([c.group for c in sel.classes]).value_counts(sort=False)
    per_group = ", ".join(f"{g} {n}" for g, n in groups.items())
    return f"""# glyphs: the embedded default retrieval data set of arcfold

Rendered Unicode letters; each class is one character, each group is a script.  Generated by
`python -m arcfold.datasets.glyphs --seed {seed} --images-per-class {images_per_class} --image-size {image_size}`
(module `arcfold.datasets.glyphs`, whose docstring describes the method); regeneration with the same
seed is byte-identical.

* {len(sel.classes)} classes in {len(groups)} groups ({per_group}); {n_images} grayscale PNG images of
  {image_size}x{image_size} pixels, {images_per_class} per class, dark ink on a light background.
* Each image: a font among those covering the character, random stroke weight, affine (rotation,
  scale, aspect, shear, translation), background grey level / gradient / texture, ink level, an
  occasional faint line, blur and noise.
* Look-alike characters across and within scripts were merged by keeping only the first
  ({len(sel.dropped_confusables)} dropped, listed below); characters with fewer than {MIN_FONTS} covering
  fonts were dropped ({len(sel.dropped_few_fonts)}).
* Files: `train.csv` (image,label,group), `classes.csv` (label,group,char,codepoint,unicode_name,
  n_fonts,fonts), `images/<group>/<codepoint>_<index>.png`.

## Fonts and licence

Only the fonts shipped with matplotlib (`matplotlib/mpl-data/fonts/ttf`) are used: DejaVu
(Bitstream Vera licence + public-domain DejaVu changes, see `LICENSE_DEJAVU` there), STIX
(SIL Open Font License 1.1, see `LICENSE_STIX` there) and the BaKoMa Computer Modern TrueType
fonts (free to use and redistribute).  The rendered images are derived from these fonts.

## Dropped confusables

Character dropped -> kept character it looks like (font of the comparison, unmatched ink pixels;
"hand list" for the explicit safety-net pairs):

{chr(10).join(_confusable_line(*d) for d in sel.dropped_confusables)}

Font styles removed from a class because the character looks like another class in that style:

{chr(10).join(_font_drop_line(*d) for d in sel.dropped_fonts)}
"""


def _char_of(label: str) -> str:
    return chr(int(label.rsplit("_", 1)[1], 16))


def _font_drop_line(label: str, font_name: str, other: str) -> str:
    return f"* {_char_of(label)} `{label}` without {font_name} (looks like {_char_of(other)} `{other}`)"


def _confusable_line(dropped: str, kept: str, font_name: str, score: float) -> str:
    how = "hand list" if not font_name else f"{font_name}, {score:.0f} px"
    return f"* {_char_of(dropped)} `{dropped}` -> {_char_of(kept)} `{kept}` ({how})"


def generate_glyphs(
    out_dir: str | Path = DEFAULT_GLYPHS_DIR,
    *,
    seed: int = 0,
    images_per_class: int = 16,
    image_size: int = 64,
    progress: bool = True,
) -> pd.DataFrame:
    """Generate the data set into ``out_dir`` (replacing it atomically) and return the train table."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if images_per_class < 1 or image_size < 16:
        raise ValueError(f"need images_per_class >= 1 and image_size >= 16, got {images_per_class}, {image_size}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sel = select_classes(image_size)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        rows: list[dict[str, str]] = []
        jobs = [(gc, i) for gc in sel.classes for i in range(images_per_class)]
        for group in {gc.group for gc in sel.classes}:
            (tmp / "images" / group).mkdir(parents=True, exist_ok=True)
        iterator = jobs
        if progress:
            iterator = tqdm(jobs, desc="glyphs", unit="img", mininterval=0.5)
        for gc, i in iterator:
            rel = f"images/{gc.group}/{gc.hex}_{i:02d}.png"
            Image.fromarray(render_image(gc, seed, i, image_size)).save(tmp / rel, format="PNG")
            rows.append({"image": rel, "label": gc.label, "group": gc.group})
        train = pd.DataFrame(rows, columns=["image", "label", "group"])
        train = train.sort_values(["label", "image"], kind="stable").reset_index(drop=True)
        train.to_csv(tmp / "train.csv", index=False)
        classes = pd.DataFrame(
            [
                {
                    "label": gc.label,
                    "group": gc.group,
                    "char": gc.char,
                    "codepoint": f"U+{gc.codepoint:04X}",
                    "unicode_name": unicodedata.name(gc.char, ""),
                    "n_fonts": len(gc.fonts),
                    "fonts": ";".join(gc.fonts),
                }
                for gc in sel.classes
            ]
        ).sort_values("label", kind="stable")
        classes.to_csv(tmp / "classes.csv", index=False, encoding="utf-8")
        (tmp / "README.md").write_text(_readme(sel, seed, images_per_class, image_size, len(train)), encoding="utf-8")
        # swap in as a whole: readers see the old complete set or the new complete set
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "glyphs: %d classes in %d groups, %d images (%dx%d) in %s; dropped %d confusables, %d with < %d fonts, "
        "%d by the per-group cap; %.1f s",
        len(sel.classes),
        train["group"].nunique(),
        len(train),
        image_size,
        image_size,
        out_dir,
        len(sel.dropped_confusables),
        len(sel.dropped_few_fonts),
        MIN_FONTS,
        len(sel.dropped_by_cap),
        time.perf_counter() - t0,
    )
    return train


def ensure_glyphs(out_dir: str | Path = DEFAULT_GLYPHS_DIR, *, seed: int = 0, **kwargs) -> Path:
    """Generate into out_dir only if out_dir/train.csv is absent; return path of train.csv.

    Under a lock beside ``out_dir``: processes started together (two ``train_fold.sh``) generate the set
    once, the others wait and reuse it, and none swaps the folder while another reads it.
    """

    out_dir = Path(out_dir)
    csv = out_dir / "train.csv"
    if csv.exists():
        return csv
    with file_lock(out_dir.parent / f".{out_dir.name}.lock", what=f"data set {out_dir}"):
        if not csv.exists():  # made by the process we waited for?
            generate_glyphs(out_dir, seed=seed, **kwargs)
    return csv


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m arcfold.datasets.glyphs", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_GLYPHS_DIR, help="output directory (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-class", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--list-confusables",
        type=float,
        metavar="MAX_PX",
        help="print the candidate pairs with unmatched ink <= MAX_PX in the reference fonts and exit",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list_confusables is not None:
        with pd.option_context("display.max_rows", None, "display.width", 200):
            print(find_confusable_pairs(args.list_confusables).to_string())
        return 0
    generate_glyphs(
        args.out,
        seed=args.seed,
        images_per_class=args.images_per_class,
        image_size=args.image_size,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
