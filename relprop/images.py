"""Data sets for attributing (``relprop attribute``/``explain``): image folders, torchvision.

* :class:`Preprocessing`: resize the shorter side, centre-crop, normalise (the
  ``torchvision`` ImageNet evaluation recipe); :data:`IMAGENET` is 256 -> 224 with the
  ImageNet mean/std.
* :func:`list_images` lists the images under a folder (recursive, sorted, extensions
  ``.jpg .jpeg .png .bmp .webp .tif .tiff .gif``, case-insensitive).  If every image lies inside a
  first-level sub-folder (the torchvision ``ImageFolder`` layout ``root/<class>/...``)
  the sub-folder names, sorted, are the classes and give each image its label;
  otherwise there are no labels.
* :class:`ImageFolderDataset` (the images of a folder) and :class:`TorchvisionDataset`
  (a ``torchvision.datasets`` class such as ``FakeData`` or ``CIFAR10``, never
  downloaded) both return ``(index, image tensor, None)`` per item, or for an item that
  cannot be read the marker ``(index, None, error message)`` that :func:`collate` drops
  and reports, so a run goes on without it.  ``item_id(i)`` is a stable name of item
  ``i``: the path relative to the folder, or ``NAME[options]:i``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
from typing import Sequence

import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")   # what explain reads too
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RESIZE = 256
DEFAULT_SIZE = 224
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """PIL image -> RGB (16-bit and float greyscale images as intensities in [0, 1], see
    :func:`as_rgb_or_unit_grey`), shorter side resized to ``resize`` (None: not resized), centre crop
    ``size`` x ``size``, normalised with ``mean``/``std``: a (3, size, size) float32 tensor."""

    size: int = DEFAULT_SIZE
    resize: int | None = DEFAULT_RESIZE
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.size < 1 or (self.resize is not None and self.resize < self.size):
            raise ValueError(f"need size >= 1 and resize >= size, got size={self.size}, resize={self.resize}")
        if (len(self.mean) != 3 or len(self.std) != 3 or not all(0 < s < math.inf for s in self.std)
                or not all(math.isfinite(m) for m in self.mean)):
            raise ValueError(f"mean and std need 3 finite values each (std > 0), got mean={self.mean}, std={self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def __call__(self, image) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        image = as_rgb_or_unit_grey(image)
        if self.resize is not None:
            mode = TF.InterpolationMode(self.interpolation)
            image = TF.resize(image, self.resize, interpolation=mode, antialias=True)
        image = TF.center_crop(image, [self.size, self.size])
        x = TF.to_tensor(image)
        if image.mode == "F":     # grey intensities in [0, 1] (a 16-bit or float image): to RGB, clipped
            x = x.clamp(0.0, 1.0).expand(3, -1, -1).contiguous()     # as an 8-bit resize clips to 0..255
        return TF.normalize(x, self.mean, self.std)

    def load(self, path) -> torch.Tensor:
        """One image file -> tensor (raises on an unreadable file, or a 32-bit or float image
        whose range is not known, see :func:`as_rgb_or_unit_grey`).  The EXIF orientation of
        a photo is applied first, so a phone photo is explained upright."""
        from PIL import Image

        with Image.open(path) as im:
            return self(exif_upright(im))

    def as_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}


IMAGENET = Preprocessing()

_EXIF_ORIENTATION = 0x0112
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def exif_upright(image):
    """``image`` turned as its EXIF orientation tag says (phone photos are stored sideways with
    a tag saying so); the image itself when it has no such tag or the tag says upright."""
    from PIL import ImageOps

    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:         # unreadable EXIF: the pixels as stored
        return image
    return image if orientation in (None, 1) else ImageOps.exif_transpose(image)


def as_rgb_or_unit_grey(image):
    """A Pillow image ready for resizing: an 8-bit image (``RGB``, ``L``, ``P``, ``RGBA``...)
    converted to ``RGB``; a 16-bit or float greyscale image as mode ``F`` holding intensities
    in [0, 1] (Pillow's ``convert("RGB")`` would clip its values to 255, so that a 16-bit image
    would come out almost white).

    * ``I;16`` (``I;16L``, ``I;16B``, ``I;16N``; a 16-bit PNG or TIFF): divided by 65535;
    * ``I`` (32-bit integers; older Pillow reads 16-bit PNGs so): divided by 65535 when its
      values lie in 0..65535, else ValueError (its range is unknown);
    * ``F`` (32-bit floats): taken as is when its values lie in [0, 1], else ValueError.
    """
    import numpy as np
    from PIL import Image

    if image.mode not in HIGH_DEPTH_MODES:
        return image.convert("RGB")
    values = np.asarray(image.convert("F"), dtype=np.float32)
    if image.mode == "F":
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(f"float image (Pillow mode F) with values in [{np.nanmin(values):g}, "
                             f"{np.nanmax(values):g}]{'' if np.isfinite(values).all() else ' and NaN/inf'}: relprop "
                             "reads float images as intensities in [0, 1]; rescale it to [0, 1] or save it as an "
                             "8- or 16-bit image")
        return Image.fromarray(values)
    if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"32-bit integer image (Pillow mode I) with values in [{values.min():g}, {values.max():g}], "
                         "outside the 16-bit range 0..65535: relprop cannot tell its range; save it as an 8- or "
                         "16-bit image")
    return Image.fromarray(values / np.float32(65535))


def list_images(root) -> tuple[list[str], list[int] | None, list[str]]:
    """``(paths, labels, classes)`` for the images under ``root``.

    ``paths`` are ``os.path.join(root, relative path)``, sorted by relative path (with
    ``/`` separators, so the order is the same on every machine).  Symbolic links to
    folders are followed, but every real folder is listed once (the first path to it in
    sorted order), so a link loop does not repeat images.  ``labels`` is None
    and ``classes`` empty unless the folder has the ImageFolder layout (see the module
    docstring).  Raises FileNotFoundError / NotADirectoryError / ValueError (no images).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data folder {root!r} is not a folder")
    rel, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:                     # vanished while listing
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a folder reached again through a symbolic link (a loop, or two
            dirs[:] = []                    # links to one folder): its images are listed once, at the first path
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    if not rel:
        raise ValueError(f"data folder {root!r} holds no images (looked recursively for "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    rel.sort()
    paths = [os.path.join(root, *r.split("/")) for r in rel]
    if all("/" in r for r in rel):
        classes = sorted({r.split("/", 1)[0] for r in rel})
        lookup = {c: i for i, c in enumerate(classes)}
        return paths, [lookup[r.split("/", 1)[0]] for r in rel], classes
    return paths, None, []


class ImageFolderDataset(torch.utils.data.Dataset):
    """The images under ``root`` (see :func:`list_images`), preprocessed for a CNN.

    ``dataset[i]`` is ``(i, image tensor (3, size, size), None)`` or, for a file Pillow
    cannot read, the marker ``(i, None, "error message")``.
    """

    def __init__(self, root, preprocessing: Preprocessing = IMAGENET):
        self.root = os.fspath(root)
        self.paths, self.labels, self.classes = list_images(root)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def item_id(self, i: int) -> str:
        """The path of item ``i`` relative to the folder, with ``/`` separators."""
        return os.path.relpath(self.paths[i], self.root).replace(os.sep, "/")

    def relative_path(self, i: int) -> str:
        """The file of item ``i`` relative to the folder (``os.path.join(root, relative_path(i))``
        opens it from anywhere the folder is reachable), whatever the working directory."""
        return os.path.relpath(self.paths[i], self.root)

    def fingerprint(self) -> dict:
        """What identifies the items and their preprocessing (stored in ``run.json``)."""
        names = "\n".join(self.item_id(i) for i in range(len(self)))
        return {"root": os.path.abspath(self.root), "images": len(self.paths),
                "files_sha256": hashlib.sha256(names.encode()).hexdigest(), **self.preprocessing.as_dict()}

    def __getitem__(self, i: int):
        try:
            return i, self.preprocessing.load(self.paths[i]), None
        except Exception as e:   # unreadable, corrupt, truncated: reported and skipped by the caller
            return i, None, f"{type(e).__name__}: {e}"


class TorchvisionDataset(torch.utils.data.Dataset):
    """``torchvision.datasets.<name>(root, **options)``, preprocessed; never downloaded.

    ``root`` is required by the data sets that store files (CIFAR10, ImageNet...) and
    refused by those that do not (FakeData).  Labels come from the data set's
    ``targets`` or, when it has none, from its items (integer targets only; otherwise
    there are no labels).  Raises ValueError for an unknown name or bad options and
    FileNotFoundError (saying how to get the files) when the data are not under ``root``.
    """

    def __init__(self, name: str, root=None, preprocessing: Preprocessing = IMAGENET, options: dict | None = None):
        import torchvision.datasets

        cls = getattr(torchvision.datasets, name, None)
        if name.startswith("_") or not (inspect.isclass(cls) and issubclass(cls, torch.utils.data.Dataset)):
            raise ValueError(f"unknown torchvision data set {name!r}; use a class of torchvision.datasets such as "
                             "FakeData, CIFAR10, MNIST, ImageNet or Food101")
        self.name, self.options, self.preprocessing = name, dict(options or {}), preprocessing
        params = inspect.signature(cls).parameters
        if "download" in self.options:
            raise ValueError("relprop never downloads data sets: drop the download option")
        kwargs = dict(self.options, **({"download": False} if "download" in params else {}))
        if "root" in params:
            if root is None:
                raise ValueError(f"torchvision data set {name} needs its folder: --data ROOT")
            if not os.path.isdir(root):
                raise FileNotFoundError(f"data folder {os.fspath(root)!r} of torchvision data set {name} "
                                        "does not exist")
            kwargs["root"] = os.fspath(root)
        elif root is not None:
            raise ValueError(f"torchvision data set {name} has no folder; drop --data")
        self.root = None if root is None else os.fspath(root)
        try:
            self.data = cls(**kwargs)
        except TypeError as e:
            raise ValueError(f"bad options for torchvision data set {name}: {e}") from None
        except (RuntimeError, OSError) as e:
            raise FileNotFoundError(
                f"torchvision data set {name} is not under {self.root!r} ({type(e).__name__}: {e}); relprop never "
                f"downloads: run torchvision.datasets.{name}(ROOT, download=True) on a machine with internet and copy "
                "ROOT here") from None
        self.paths = None
        self.labels = self._labels()

    def _labels(self):
        targets = getattr(self.data, "targets", None)
        if targets is not None and len(targets) == len(self.data):
            return [int(t) for t in targets]
        if len(self.data) and _as_int(self.data[0][1]) is not None:
            return _ItemLabels(self.data)
        return None

    def __len__(self) -> int:
        return len(self.data)

    def item_id(self, i: int) -> str:
        """``NAME[key=value,...]:i`` (the options that select the items, e.g. ``train=False``)."""
        opts = ",".join(f"{k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{self.name}{f'[{opts}]' if opts else ''}:{i}"

    def fingerprint(self) -> dict:
        return {"dataset": self.name, "root": None if self.root is None else os.path.abspath(self.root),
                "options": {k: repr(v) for k, v in sorted(self.options.items())}, "images": len(self),
                **self.preprocessing.as_dict()}

    def __getitem__(self, i: int):
        try:
            return i, self.preprocessing(self.data[i][0]), None
        except Exception as e:   # unreadable or corrupt item: reported and skipped by the caller
            return i, None, f"{type(e).__name__}: {e}"


class _ItemLabels:
    """``labels[i]``: the integer target of item ``i``, read from the data set on demand."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> int:
        return int(self.data[i][1])


def _as_int(value):
    try:
        return int(value) if not isinstance(value, (str, bytes, float)) else None
    except (TypeError, ValueError, RuntimeError):
        return None


def collate(samples):
    """Batch dataset items: ``(images (B, 3, H, W) or None, indices, skipped)``.

    ``skipped`` lists ``(index, error message)`` of the items that could not be loaded.
    """
    good = [s for s in samples if s[1] is not None]
    skipped = [(s[0], s[2]) for s in samples if s[1] is None]
    x = torch.stack([s[1] for s in good]) if good else None
    return x, [s[0] for s in good], skipped
