"""Image folders and models for attributing data sets (``relprop attribute``/``explain``).

* :func:`list_images` lists the images under a folder (recursive, sorted, extensions
  ``.jpg .jpeg .png .bmp .webp``, case-insensitive).  If every image lies inside a
  first-level sub-folder (the torchvision ``ImageFolder`` layout ``root/<class>/...``)
  the sub-folder names, sorted, are the classes and give each image its label;
  otherwise there are no labels.
* :class:`ImageFolderDataset` loads one image with Pillow, converts it to RGB, resizes
  its shorter side to ``resize``, centre-crops ``size`` x ``size`` and normalises with
  ``mean``/``std`` (ImageNet statistics by default).  An unreadable or corrupt file does
  not raise: the item is a marker ``(index, None, error message)`` that
  :func:`collate` drops and reports, so a run goes on without it.
* :func:`load_model` resolves a model spec: a torchvision architecture name or
  ``package.module:function``.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from typing import Sequence

import torch
import torch.nn as nn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RESIZE = 256
DEFAULT_SIZE = 224

MODEL_SPEC_HELP = ("a model is either a torchvision architecture name (e.g. resnet50, vgg16; "
                   "weights from --weights PATH, a state dict) or 'package.module:function', a function "
                   "importable from the Python path that returns a torch.nn.Module")


def list_images(root) -> tuple[list[str], list[int] | None, list[str]]:
    """``(paths, labels, classes)`` for the images under ``root``.

    ``paths`` are ``os.path.join(root, relative path)``, sorted by relative path (with
    ``/`` separators, so the order is the same on every machine).  ``labels`` is None
    and ``classes`` empty unless the folder has the ImageFolder layout (see the module
    docstring).  Raises FileNotFoundError / NotADirectoryError / ValueError (no images).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"data folder {root!r} is not a folder")
    rel = []
    for folder, dirs, files in os.walk(root, followlinks=True):
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

    def __init__(self, root, size: int = DEFAULT_SIZE, resize: int | None = DEFAULT_RESIZE,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if size < 1 or (resize is not None and resize < size):
            raise ValueError(f"need size >= 1 and resize >= size, got size={size}, resize={resize}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={mean}, std={std}")
        self.root = os.fspath(root)
        self.paths, self.labels, self.classes = list_images(root)
        self.size, self.resize = int(size), (int(resize) if resize is not None else None)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> dict:
        """What identifies the items and their preprocessing (stored in ``run.json``)."""
        names = "\n".join(os.path.relpath(p, self.root) for p in self.paths)
        return {"root": os.path.abspath(self.root), "images": len(self.paths),
                "files_sha256": hashlib.sha256(names.encode()).hexdigest(), "size": self.size,
                "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    def load(self, path) -> torch.Tensor:
        """One image file -> normalised (3, size, size) float32 tensor (raises on a bad file)."""
        from PIL import Image
        import torchvision.transforms.functional as TF

        with Image.open(path) as im:
            im = im.convert("RGB")
        if self.resize is not None:
            im = TF.resize(im, self.resize, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        im = TF.center_crop(im, [self.size, self.size])
        return TF.normalize(TF.to_tensor(im), self.mean, self.std)

    def __getitem__(self, i: int):
        try:
            return i, self.load(self.paths[i]), None
        except Exception as e:   # unreadable, corrupt, truncated: reported and skipped by the caller
            return i, None, f"{type(e).__name__}: {e}"


def collate(samples):
    """Batch dataset items: ``(images (B, 3, H, W) or None, indices, skipped)``.

    ``skipped`` lists ``(index, error message)`` of the items that could not be loaded.
    """
    good = [s for s in samples if s[1] is not None]
    skipped = [(s[0], s[2]) for s in samples if s[1] is None]
    x = torch.stack([s[1] for s in good]) if good else None
    return x, [s[0] for s in good], skipped


def load_model(spec: str, weights=None, num_classes: int | None = None) -> nn.Module:
    """Resolve ``spec`` to a model in eval mode.

    ``spec``: a torchvision architecture name (built with ``weights=None``, i.e. random
    initialisation, then ``weights`` loaded) or ``"package.module:function"`` (called,
    with ``num_classes=`` if given, and must return an ``nn.Module``).  ``weights``: path
    of a state dict (``torch.save(model.state_dict(), path)``; a checkpoint dict holding
    it under ``"state_dict"`` or ``"model"`` works too), loaded strictly.  Raises
    ValueError with a clear message for an unknown spec or a bad weights file.  The model
    is built with the random seed 0 (the caller's random state is left alone), so a
    model without ``weights`` is the same in every process and run.
    """
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    # seeded (without touching the caller's RNG): a model without --weights gets the same
    # random weights in every process and every run, so runs can be resumed and split
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _build(spec, kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _build(spec: str, kwargs: dict) -> nn.Module:
    import torchvision

    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import model function {spec!r} ({type(e).__name__}: {e}); "
                             f"{MODEL_SPEC_HELP}") from None
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    else:
        names = torchvision.models.list_models()
        if spec not in names:
            raise ValueError(f"unknown model {spec!r}; {MODEL_SPEC_HELP}. torchvision architectures: "
                             f"{', '.join(names)}")
        model = torchvision.models.get_model(spec, weights=None, **kwargs)
    return model


def load_weights(model: nn.Module, path) -> None:
    """Load a state dict file into ``model`` strictly; ValueError if it does not fit."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"weights file {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read weights file {path!r}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ValueError(f"weights file {path!r} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights file {path!r} does not fit the model: {e}") from None


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and values of the parameters and buffers."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
