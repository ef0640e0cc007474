"""Procedural "shapes in clutter": a localisation data set with exact masks and boxes.

Each image shows one object (``multi_object=False``, for classification), two objects
of two *different* classes (``multi_object=True``, for the contrastive case), or, in the
*hard* mode (``hard=True``, ``relprop evaluate --split hard``), 3-4 smaller objects of
distinct classes of which the first is the target, under stronger clutter (4-8
distractors, pixel noise of std 0.04-0.08), so that a map must single out the target
among other objects; out of
:data:`CLASSES`, each at a random position, scale, rotation and colour, drawn over a
textured background (smooth noise, stripes or a checker pattern with random colours,
orientation and frequency) together with 0-3 *distractors* (small wobbly blobs and short
line segments -- never one of the class shapes) and per-pixel Gaussian noise.

Ground truth per object: its class, an exact mask (the pixels whose *centre* lies inside
the shape) and the tight box of that mask, ``(x0, y0, x1, y1)`` inclusive-exclusive with
``x`` = column -- the conventions of :mod:`relprop.metrics`.

Geometry and guarantees:

* every shape is a signed distance function (in pixels) of the rotated, scaled pixel
  coordinates; it is anti-aliased by a one-pixel linear ramp (coverage
  ``clamp(0.5 - distance, 0, 1)``), and its mask is ``distance <= 0``;
* ``r``, the radius of an object's bounding circle, is ``size * U(0.18, 0.32)`` for single
  objects and ``size * U(0.13, 0.20)`` in two-object images; every object lies entirely
  inside the image (bounding circle at least one pixel from the border);
* the two objects of a two-object image never overlap: their bounding circles are at
  least :data:`OBJECT_GAP` pixels apart;
* a hard image: the target (class ``index % len(CLASSES)``, object 0) and 2-3 others
  (:data:`HARD_OBJECTS`) whose classes are distinct and differ from the target's, radius
  ``size * U(0.10, 0.15)`` (:data:`HARD_RADIUS`), bounding circles pairwise at least
  :data:`OBJECT_GAP` apart (placed one after another; one that finds no place in 90 tries
  is left out -- never the target, placed first), so every mask is exact and unoccluded;
* distractors never touch an object: every pixel a distractor paints (coverage > 0) lies
  at least :data:`DISTRACTOR_CLEARANCE` - 0.5 pixels outside every object's bounding
  circle, so the fraction of an object's mask covered by distractors is exactly 0
  (a distractor that cannot be placed so after 30 tries is left out: an image may hold
  fewer distractors than drawn from ``num_distractors``);
* the object colour is kept at least :data:`MIN_CONTRAST` (Euclidean RGB distance) from
  both background colours whenever 30 random tries find one.

Every item is generated from its own seed, a hash (BLAKE2b) of ``(seed, split,
kind, index)`` with kind single, multi or hard (independent streams; the single and
multi streams are those of earlier releases),
so item ``i`` is the same in every process, whatever the access order or batching.
Classes are balanced: the (first) object of item ``i`` has class ``i % len(CLASSES)``.

Speed: rendering is vectorised with torch over the pixels of a whole batch
(:meth:`ShapesDataset.make_batch`).  Profiled on one CPU core (torch 2.x): about 1.2 s per
1000 images of 64 x 64 (0.4-0.6 s of it the per-item parameter draws in Python, ~0.3 s
compositing, the rest the pixel-wise shape / texture maths) and about 17 s per 1000 images
of 224 x 224.  Render large sets in batches of a few hundred to bound memory;
``ShapesDataset[i]`` renders a batch of one (about 2 ms on one thread).

    >>> data = ShapesDataset(1000, size=64, seed=0, split="test")
    >>> batch = data.make_batch(range(64))
    >>> batch["images"].shape, batch["labels"].shape, batch["masks"].shape
    (torch.Size([64, 3, 64, 64]), torch.Size([64]), torch.Size([64, 64, 64]))
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import numpy as np
import torch

CLASSES = ("square", "disc", "triangle", "cross", "star", "ring", "diamond", "hexagon", "crescent", "ellipse")
# Per-channel mean / std of the images, measured on 4096 training images of 64 x 64
# (seed 0, single objects, default distractors); used by :func:`normalise`.
MEAN = (0.490, 0.496, 0.501)
STD = (0.261, 0.258, 0.263)
OBJECT_GAP = 2.0              # px between the bounding circles of two objects
DISTRACTOR_CLEARANCE = 2.0    # px between a distractor's extent and an object's bounding circle
MIN_CONTRAST = 0.5            # Euclidean RGB distance of the object colour from the background colours
SPLITS = ("train", "test")
_TRIES = 30
# The hard mode (``hard=True``): several objects of distinct classes, the first one the
# target, smaller than single objects, with more distractors and stronger pixel noise.
HARD_OBJECTS = (3, 4)           # objects per image, inclusive range: the target + 2-3 others
HARD_RADIUS = (0.10, 0.15)      # bounding-circle radius / size (single objects: 0.18-0.32)
HARD_DISTRACTORS = (4, 8)       # default num_distractors (normal images: 0-3)
HARD_NOISE = (0.04, 0.08)       # std of the per-pixel Gaussian noise (normal images: 0.01-0.05)


# --------------------------------------------------------------------------- shapes
# Signed distance functions of unit-radius shapes (bounding circle radius <= 1) in local,
# rotated coordinates (u, v); the result is in units of the radius.
def _regular_polygon(u, v, n: int, apothem: float, offset: float):
    d = None
    for k in range(n):
        a = offset + 2 * math.pi * k / n
        e = u * math.cos(a) + v * math.sin(a)
        d = e if d is None else torch.maximum(d, e)
    return d - apothem


def _sd_square(u, v):
    return torch.maximum(u.abs(), v.abs()) - 0.75


def _sd_disc(u, v):
    return torch.hypot(u, v) - 0.85


def _sd_triangle(u, v):             # equilateral, circumradius 1
    return _regular_polygon(u, v, 3, 0.5, -math.pi / 2)


def _sd_cross(u, v):                # arms 1.9 long, 0.6 wide
    au, av = u.abs(), v.abs()
    return torch.minimum(torch.maximum(au - 0.95, av - 0.3), torch.maximum(au - 0.3, av - 0.95))


_STAR_INNER = 0.45
_STAR_SECTOR = 2 * math.pi / 5
_STAR_TIP = (math.cos(_STAR_SECTOR / 2), math.sin(_STAR_SECTOR / 2))
_e = (_STAR_TIP[0] - _STAR_INNER, _STAR_TIP[1])
_STAR_NORMAL = (_e[1] / math.hypot(*_e), -_e[0] / math.hypot(*_e))


def _sd_star(u, v):                 # five points, outer radius 1, inner radius 0.45
    rho = torch.hypot(u, v)
    phi = (torch.remainder(torch.atan2(v, u), _STAR_SECTOR) - _STAR_SECTOR / 2).abs()   # fold into one half-point
    qx, qy = rho * torch.cos(phi), rho * torch.sin(phi)
    return (qx - _STAR_INNER) * _STAR_NORMAL[0] + qy * _STAR_NORMAL[1]


def _sd_ring(u, v):                 # radii 0.52 .. 0.92
    return (torch.hypot(u, v) - 0.72).abs() - 0.2


def _sd_diamond(u, v):              # rhombus, half-diagonals 1.0 and 0.6
    return (u.abs() * 0.6 + v.abs() - 0.6) / math.hypot(0.6, 1.0)


def _sd_hexagon(u, v):
    return _regular_polygon(u, v, 6, 0.85, 0.0)


def _sd_crescent(u, v):             # disc 0.92 minus a disc 0.74 shifted by 0.42
    return torch.maximum(torch.hypot(u, v) - 0.92, 0.74 - torch.hypot(u - 0.42, v))


def _sd_ellipse(u, v):              # semi-axes 1.0 and 0.45 (first-order distance estimate)
    a, b = 1.0, 0.45
    k = torch.hypot(u / a, v / b)
    g = torch.hypot(u / (a * a), v / (b * b))
    return torch.where(k < 0.5, (k - 1) * b, k * (k - 1) / g.clamp_min(1e-6))


_SDF = {"square": _sd_square, "disc": _sd_disc, "triangle": _sd_triangle, "cross": _sd_cross,
        "star": _sd_star, "ring": _sd_ring, "diamond": _sd_diamond, "hexagon": _sd_hexagon,
        "crescent": _sd_crescent, "ellipse": _sd_ellipse}
assert tuple(_SDF) == CLASSES


def _local(size: int, cx, cy, angle, H: int | None = None):
    """Rotated pixel-centre coordinates relative to (cx, cy): (u, v), each (b, H, W), in px."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, -1) - cx.view(-1, 1, 1)
    dy = coords.view(1, -1, 1) - cy.view(-1, 1, 1)
    c, s = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    return c * dx + s * dy, c * dy - s * dx


def _shape_distance(name: str, size: int, cx, cy, r, angle):
    """Signed distance in px of shape ``name`` (1-D parameter tensors, one per image): (b, H, W)."""
    u, v = _local(size, cx, cy, angle)
    r3 = r.view(-1, 1, 1)
    return _SDF[name](u / r3, v / r3) * r3


def render_shape(name: str, size: int = 64, cx: float | None = None, cy: float | None = None,
                 radius: float | None = None, angle: float = 0.0):
    """One shape on an empty ``size`` x ``size`` canvas: (coverage (H, W) float in [0, 1], mask (H, W) bool).

    ``cx``, ``cy`` (pixel coordinates, x = column; default: the image centre) place the
    centre, ``radius`` (default ``0.3 * size``) is the radius of the shape's bounding
    circle and ``angle`` its rotation in radians.  The mask is ``coverage >= 0.5``: the
    pixels whose centre lies inside the shape.
    """
    if name not in _SDF:
        raise ValueError(f"unknown shape {name!r}; valid shapes: {', '.join(CLASSES)}")
    t = lambda x, d: torch.tensor([float(d if x is None else x)])  # noqa: E731
    sd = _shape_distance(name, size, t(cx, size / 2), t(cy, size / 2), t(radius, 0.3 * size), t(angle, 0))[0]
    return (0.5 - sd).clamp(0, 1), sd <= 0


def _sd_blob(size, cx, cy, a, aspect, angle, phase, phase2):
    """An irregular blob: an ellipse whose radius wobbles with 2- and 5-fold harmonics."""
    u, v = _local(size, cx, cy, angle)
    a3, b3 = a.view(-1, 1, 1), (a * aspect).view(-1, 1, 1)
    uu, vv = u / a3, v / b3
    theta = torch.atan2(vv, uu)
    wobble = 1 + 0.2 * torch.sin(2 * theta + phase.view(-1, 1, 1)) + 0.1 * torch.sin(5 * theta + phase2.view(-1, 1, 1))
    return (torch.hypot(uu, vv) - wobble) * b3


def _sd_line(size, cx, cy, half_length, half_width, angle):
    u, v = _local(size, cx, cy, angle)
    return torch.hypot((u.abs() - half_length.view(-1, 1, 1)).clamp_min(0), v) - half_width.view(-1, 1, 1)


# --------------------------------------------------------------------------- data set
def _item_seed(seed: int, split: str, multi_object: bool, index: int, hard: bool = False) -> int:
    kind = "hard" if hard else "multi" if multi_object else "single"     # an independent stream per kind
    key = f"relprop.benchmark.shapes:{seed}:{split}:{kind}:{index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def normalise(images: torch.Tensor) -> torch.Tensor:
    """``(images - MEAN) / STD`` per channel, for ``(B, 3, H, W)`` or ``(3, H, W)`` images in [0, 1].

    :data:`MEAN` / :data:`STD` were measured on the training split (see their comment).
    """
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def _boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight inclusive-exclusive boxes of ``(N, H, W)`` masks: ``(N, 4)`` long; an empty mask gives zeros."""
    n, H, W = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    y0 = rows.int().argmax(1)
    y1 = H - rows.flip(1).int().argmax(1)
    x0 = cols.int().argmax(1)
    x1 = W - cols.flip(1).int().argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1).long()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))


def collate(items: Sequence[dict]) -> dict:
    """Items of :class:`ShapesDataset` -> a batch (use as a DataLoader ``collate_fn``).

    Returns ``images`` (B, 3, H, W), ``labels`` (B,) long (first object's class),
    ``masks`` (B, H, W) bool (first object's mask) and ``boxes`` (a length-B list of
    ``(n_obj, 4)`` long tensors, every object's box -- the per-image list form of
    :mod:`relprop.metrics`), plus per-image lists ``object_labels`` ``(n_obj,)``,
    ``object_masks`` ``(n_obj, H, W)`` and ``distractor_masks`` ``(n_distractors, H, W)``.
    """
    items = list(items)
    if not items:
        raise ValueError("collate needs at least one item")
    return {
        "images": torch.stack([it["image"] for it in items]),
        "labels": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "masks": torch.stack([it["masks"][0] for it in items]),
        "boxes": [it["boxes"] for it in items],
        "object_labels": [torch.tensor(list(it["labels"]), dtype=torch.long) for it in items],
        "object_masks": [it["masks"] for it in items],
        "distractor_masks": [it["distractor_masks"] for it in items],
    }


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` procedural "shapes in clutter" images (see the module docstring).

    Item ``i`` is a dict: ``image`` (3, H, W) float32 in [0, 1], ``label`` (int, the first
    object's class index into :data:`CLASSES`), ``labels`` (list of the object classes:
    one, two distinct ones with ``multi_object``, 3-4 distinct ones with ``hard``), ``masks`` (n_obj, H, W) bool,
    ``boxes`` (n_obj, 4) long (tight boxes of the masks, inclusive-exclusive
    ``(x0, y0, x1, y1)``) and ``distractor_masks`` (n_distractors, H, W) bool (the pixels
    each distractor paints).  ``split`` selects an independent stream of images
    ("train" / "test"); ``num_distractors`` is an int or an inclusive ``(low, high)``
    range drawn uniformly per image (default: 0-3, 4-8 with ``hard``).  ``hard=True``
    gives the hard mode (module docstring: 3-4 objects, the first the target; not with
    ``multi_object``).  :meth:`make_batch` renders many items at once and
    returns them as :func:`collate` would.
    """

    def __init__(self, n: int, size: int = 64, seed: int = 0, split: str = "train", multi_object: bool = False,
                 num_distractors: int | tuple[int, int] | None = None, hard: bool = False):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if hard and multi_object:
            raise ValueError("hard=True already draws several objects per image; multi_object must be False")
        if num_distractors is None:
            num_distractors = HARD_DISTRACTORS if hard else (0, 3)
        if isinstance(num_distractors, int):
            num_distractors = (num_distractors, num_distractors)
        lo, hi = (int(k) for k in num_distractors)
        if not 0 <= lo <= hi:
            raise ValueError(f"num_distractors must be an int >= 0 or a range (low, high) with 0 <= low <= high, "
                             f"got {num_distractors!r}")
        self.n, self.size, self.seed, self.split = n, size, int(seed), split
        self.multi_object, self.num_distractors, self.hard = bool(multi_object), (lo, hi), bool(hard)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        b = self.make_batch([index])
        return {"image": b["images"][0], "label": int(b["labels"][0]),
                "labels": b["object_labels"][0].tolist(), "masks": b["object_masks"][0],
                "boxes": b["boxes"][0], "distractor_masks": b["distractor_masks"][0]}

    def _check_index(self, index) -> int:
        index = int(index)
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index out of range for a data set of {self.n} images")
        return index

    # ------------------------------------------------------------------ parameters
    def _params(self, index: int) -> dict:
        """Draw every random parameter of item ``index`` from its own generator."""
        rng = np.random.default_rng(_item_seed(self.seed, self.split, self.multi_object, index, self.hard))
        size, C = self.size, len(CLASSES)
        u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731

        # background: two colours mixed by a texture t(x, y) in [0, 1]
        c1 = rng.uniform(0.1, 0.9, 3)
        c2 = np.clip(c1 + rng.uniform(-0.35, 0.35, 3), 0, 1)
        kind = int(rng.integers(3))                      # 0 noise, 1 stripes, 2 checker
        angles = rng.uniform(0, 2 * math.pi, 4)
        freqs = rng.uniform(0.5, 3.0, 4)                 # cycles per image
        phases = rng.uniform(0, 2 * math.pi, 4)
        amps = rng.uniform(0.2, 1.0, 4)
        sharp = u(0.5, 3.0)
        if kind == 0:
            wave_w, lin, prod = amps, 0.5 / amps.sum(), 0.0
        else:
            freqs[:2] = u(2.0, 8.0) if kind == 1 else u(1.5, 5.0)
            angles[1] = angles[0] + math.pi / 2
            wave_w = np.array([1.0, 0.0, 0.0, 0.0])
            lin, prod = (sharp, 0.0) if kind == 1 else (0.0, sharp)
        background = dict(c1=c1, c2=c2, angles=angles, freqs=freqs, phases=phases, wave_w=wave_w,
                          lin=lin, prod=prod)

        # objects: classes, bounding circles (cx, cy, r), rotation, colour
        first = index % C
        classes = [first]
        if self.hard:
            classes, radii, centres = self._hard_layout(rng, first)
        else:
            if self.multi_object:
                classes.append(int((first + 1 + rng.integers(C - 1)) % C))
            lo_r, hi_r = (0.13, 0.20) if self.multi_object else (0.18, 0.32)
            radii = [size * u(lo_r, hi_r) for _ in classes]

            def centre(r):
                return u(r + 1, size - r - 1), u(r + 1, size - r - 1)

            centres = [centre(r) for r in radii]
            if self.multi_object:
                for _ in range(_TRIES * 3):
                    if math.dist(*centres) >= sum(radii) + OBJECT_GAP:
                        break
                    centres = [centre(r) for r in radii]
                else:                                        # opposite corners always fit
                    radii = [min(r, size / 4 - 1.5) for r in radii]
                    centres = [(radii[0] + 1, radii[0] + 1), (size - radii[1] - 1, size - radii[1] - 1)]
        colours = []
        for _ in classes:
            best, best_d = None, -1.0
            for _ in range(_TRIES):
                col = rng.uniform(0, 1, 3)
                d = min(np.linalg.norm(col - c1), np.linalg.norm(col - c2))
                if d > best_d:
                    best, best_d = col, d
                if d >= MIN_CONTRAST:
                    break
            colours.append(best)
        objects = [dict(cls=c, cx=x, cy=y, r=r, angle=u(0, 2 * math.pi), colour=col)
                   for c, (x, y), r, col in zip(classes, centres, radii, colours)]

        # distractors: small wobbly blobs or short lines, kept clear of every object
        distractors = []
        for _ in range(int(rng.integers(self.num_distractors[0], self.num_distractors[1] + 1))):
            if rng.uniform() < 0.5:
                a = size * u(0.03, 0.06)
                d = dict(kind="blob", a=a, aspect=u(0.5, 1.0), phase=u(0, 2 * math.pi), phase2=u(0, 2 * math.pi),
                         extent=1.3 * a)
            else:
                hl, hw = size * u(0.06, 0.14), max(0.6, size * u(0.008, 0.016))
                d = dict(kind="line", half_length=hl, half_width=hw, extent=hl + hw)
            d.update(angle=u(0, 2 * math.pi), colour=rng.uniform(0, 1, 3))
            for _ in range(_TRIES):
                x, y = u(0, size), u(0, size)
                if all(math.hypot(x - o["cx"], y - o["cy"]) >= o["r"] + d["extent"] + DISTRACTOR_CLEARANCE
                       for o in objects):
                    d.update(cx=x, cy=y)
                    distractors.append(d)
                    break
        noise = u(*HARD_NOISE) if self.hard else u(0.01, 0.05)
        noise = noise * rng.standard_normal((3, size, size), dtype=np.float32)
        return dict(background=background, objects=objects, distractors=distractors, noise=noise)

    def _hard_layout(self, rng, first: int) -> tuple[list, list, list]:
        """Classes, radii and centres of a hard image: the target ``first``, then 2-3 objects
        of distinct other classes, each placed where its bounding circle keeps
        :data:`OBJECT_GAP` px from every circle placed before (an object that finds no such
        place in 90 tries is left out; the target, placed first, always fits)."""
        size, C = self.size, len(CLASSES)
        n = int(rng.integers(HARD_OBJECTS[0], HARD_OBJECTS[1] + 1))
        others = [c for c in range(C) if c != first]
        candidates = [first] + [others[int(k)] for k in rng.permutation(len(others))[:n - 1]]
        classes, radii, centres = [], [], []
        for c in candidates:
            r = size * float(rng.uniform(*HARD_RADIUS))
            for _ in range(_TRIES * 3):
                x, y = (float(rng.uniform(r + 1, size - r - 1)) for _ in range(2))
                if all(math.hypot(x - cx, y - cy) >= r + rr + OBJECT_GAP for (cx, cy), rr in zip(centres, radii)):
                    classes.append(c)
                    radii.append(r)
                    centres.append((x, y))
                    break
        return classes, radii, centres

    # ------------------------------------------------------------------ rendering
    def make_batch(self, indices: Iterable[int]) -> dict:
        """Render items ``indices`` at once; returns what :func:`collate` returns for them.

        Pixel values do not depend on which other items share the batch.
        """
        indices = [self._check_index(i) for i in indices]
        if not indices:
            raise ValueError("make_batch needs at least one index")
        params = [self._params(i) for i in indices]
        B, S = len(indices), self.size
        f32 = lambda xs: torch.tensor(np.asarray(xs, dtype=np.float64), dtype=torch.float32)  # noqa: E731

        # background
        bg = [p["background"] for p in params]
        coords = torch.arange(S, dtype=torch.float32) + 0.5
        ang, freq = f32([g["angles"] for g in bg]), f32([g["freqs"] for g in bg])             # (B, 4)
        kx = (2 * math.pi / S) * freq * torch.cos(ang)
        ky = (2 * math.pi / S) * freq * torch.sin(ang)
        phase = f32([g["phases"] for g in bg])
        waves = torch.sin(kx.view(B, 4, 1, 1) * coords.view(1, 1, 1, S) + ky.view(B, 4, 1, 1) * coords.view(1, 1, S, 1)
                          + phase.view(B, 4, 1, 1))                                              # (B, 4, H, W)
        w = f32([g["wave_w"] for g in bg]).view(B, 4, 1, 1)
        lin = f32([g["lin"] for g in bg]).view(B, 1, 1)
        prod = f32([g["prod"] for g in bg]).view(B, 1, 1)
        t = (0.5 + lin * (w * waves).sum(1) + prod * waves[:, 0] * waves[:, 1]).clamp(0, 1).unsqueeze(1)
        c1, c2 = f32([g["c1"] for g in bg]).view(B, 3, 1, 1), f32([g["c2"] for g in bg]).view(B, 3, 1, 1)
        images = c1 + (c2 - c1) * t

        def paint(idx, sd, colours):
            alpha = (0.5 - sd).clamp(0, 1).unsqueeze(1)
            images[idx] = images[idx] * (1 - alpha) + f32(colours).view(-1, 3, 1, 1) * alpha

        # distractors (under the objects)
        n_dis = [len(p["distractors"]) for p in params]
        dis_masks = torch.zeros(B, max(n_dis, default=0), S, S, dtype=torch.bool)
        for slot in range(dis_masks.shape[1]):
            for kind in ("blob", "line"):
                sel = [(b, p["distractors"][slot]) for b, p in enumerate(params)
                       if slot < n_dis[b] and p["distractors"][slot]["kind"] == kind]
                if not sel:
                    continue
                idx = torch.tensor([b for b, _ in sel])
                col = lambda key: f32([d[key] for _, d in sel])  # noqa: E731
                if kind == "blob":
                    sd = _sd_blob(S, col("cx"), col("cy"), col("a"), col("aspect"), col("angle"), col("phase"),
                                  col("phase2"))
                else:
                    sd = _sd_line(S, col("cx"), col("cy"), col("half_length"), col("half_width"), col("angle"))
                paint(idx, sd, [d["colour"] for _, d in sel])
                dis_masks[idx, slot] = sd < 0.5

        # objects (hard images hold different numbers of them: slots past an image's count stay empty)
        counts = [len(p["objects"]) for p in params]
        n_obj = max(counts)
        obj_masks = torch.zeros(B, n_obj, S, S, dtype=torch.bool)
        for slot in range(n_obj):
            for c, name in enumerate(CLASSES):
                sel = [(b, p["objects"][slot]) for b, p in enumerate(params)
                       if slot < counts[b] and p["objects"][slot]["cls"] == c]
                if not sel:
                    continue
                idx = torch.tensor([b for b, _ in sel])
                col = lambda key: f32([o[key] for _, o in sel])  # noqa: E731
                sd = _shape_distance(name, S, col("cx"), col("cy"), col("r"), col("angle"))
                paint(idx, sd, [o["colour"] for _, o in sel])
                obj_masks[idx, slot] = sd <= 0

        images = (images + torch.from_numpy(np.stack([p["noise"] for p in params]))).clamp(0, 1)
        boxes = _boxes_from_masks(obj_masks.view(B * n_obj, S, S)).view(B, n_obj, 4)
        object_labels = [torch.tensor([o["cls"] for o in p["objects"]], dtype=torch.long) for p in params]
        return {
            "images": images,
            "labels": torch.stack([lab[0] for lab in object_labels]),
            "masks": obj_masks[:, 0].clone(),
            "boxes": [boxes[b, :counts[b]] for b in range(B)],
            "object_labels": object_labels,
            "object_masks": [obj_masks[b, :counts[b]] for b in range(B)],
            "distractor_masks": [dis_masks[b, :n_dis[b]] for b in range(B)],
        }
