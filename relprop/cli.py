"""The ``relprop`` command line: ``relprop demo``, ``attribute``, ``explain``, ``methods``, ``backends``."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

DESCRIPTION = """\
relprop explains the predictions of PyTorch CNN classifiers with relevance propagation:
for an input image and a class it returns a relevance map shaped like the image, red
(positive) where pixels speak for the class and blue (negative) where they speak
against it.  Methods: LRP variants, contrastive LRP (CLRP, SGLRP), RAP, RSP,
Attribution Equilibrium (AE) and gradient baselines.  In Python:

    import relprop
    relevance = relprop.Explainer(model, method="rap")(images)   # (B, 3, H, W)
"""

EXAMPLES = """\
examples:
  relprop demo                              train a small CNN, explain it with every method
  relprop demo --methods rap,lrp-epsilon    only two methods
  relprop explain cat.jpg --model resnet50 --weights resnet50.pth -o maps/
                                            heatmaps of your own images (RAP)
  relprop attribute --data val/ --model resnet50 --weights resnet50.pth --out attr/
                                            attribute an image folder into shards, resumable
  relprop methods                           list the methods
  relprop backends                          which compute backends are usable here
"""

DEMO_DESCRIPTION = """\
Self-contained demo, nothing to download: draws synthetic 64x64 images of coloured
shapes (square, disc, triangle, cross) on noisy backgrounds, trains a small VGG-style
CNN on them on the CPU (well under a minute with the defaults), prints its held-out
accuracy, explains a few held-out images with each chosen method (predicted class)
and writes

  OUT/heatmaps.png   one row per image: the input, then one heatmap per method
                     (red = positive relevance, blue = negative, white = 0)
  OUT/summary.json   accuracy, per-method seconds, "mask share" (fraction of the
                     positive relevance on the shape) and the predictions
"""

DEMO_EXAMPLES = """\
examples:
  relprop demo
  relprop demo --out /tmp/demo --methods rap,rsp,lrp-epsilon --images 4 --seed 1
"""


def _check_writable(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """Create ``folder`` and prove it writable, or stop with a usage error naming ``flag``."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        parser.error(f"{flag}: cannot write to output folder {folder!r}: {e.strerror or e}")


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEFAULT_STEPS

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="relprop", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    demo = sub.add_parser("demo", help="train a small CNN on synthetic shapes and draw every method's heatmaps",
                          description=DEMO_DESCRIPTION, epilog=DEMO_EXAMPLES, formatter_class=fmt)
    demo.add_argument("--out", default="relprop-demo", metavar="DIR",
                      help="output folder, created if missing (default: %(default)s)")
    demo.add_argument("--methods", default="all", metavar="LIST",
                      help="'all' or a comma-separated list of method names, see 'relprop methods' (default: all)")
    demo.add_argument("--images", type=_positive, default=6, metavar="N",
                      help="held-out images to explain, one grid row each (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed for data, initialisation and training (default: %(default)s)")
    demo.add_argument("--steps", type=_non_negative, default=DEFAULT_STEPS, metavar="N",
                      help="training steps of 32 images; fewer is faster but less accurate (default: %(default)s)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(subparser=demo)

    _add_attribute_parser(sub, fmt)
    _add_explain_parser(sub, fmt)
    sub.add_parser("methods", help="list the attribution methods with a one-line description",
                   description="List every method name accepted by relprop.Explainer(model, method=...) "
                               "and by 'relprop demo --methods'.",
                   epilog="example:\n  relprop methods", formatter_class=fmt)
    sub.add_parser("backends", help="show which compute backends (torch, triton, cuda) are available and why not",
                   description="Show each compute backend relprop can run on, whether it is usable on this "
                               "machine and, if not, why.  'auto' (the default) picks the fastest usable one.",
                   epilog="example:\n  relprop backends", formatter_class=fmt)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``relprop`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "methods":
        return _methods()
    if args.command == "backends":
        return _backends()
    if args.command == "attribute":
        return _attribute(args)
    if args.command == "explain":
        return _explain(args)
    return _demo(args)


def _methods() -> int:
    from .explainer import available_methods

    methods = available_methods()
    width = max(map(len, methods))
    for name, summary in methods.items():
        print(f"{name:<{width}}  {summary}")
    return 0


def _backends() -> int:
    from .backends import backends

    for name, info in backends().items():
        state = "available" if info["available"] else "unavailable"
        reason = "" if info["available"] else f": {info['reason']}"
        print(f"{name:<7} {state}{reason}")
    return 0


def _demo(args) -> int:
    from . import demo

    parser = args.subparser
    # every check that can fail happens before any data is drawn or any step is trained
    try:
        methods = demo.check_methods([m for m in args.methods.split(",")])
    except ValueError as e:
        parser.error(f"--methods: {e}")
    _check_writable(parser, "--out", args.out)

    summary = demo.run(args.out, methods=methods, images=args.images, seed=args.seed, steps=args.steps,
                       progress=not args.quiet)
    print(demo.format_summary(summary))
    return 1 if summary["failed"] else 0


ATTRIBUTE_DESCRIPTION = """\
Attribute every image of a folder and store the relevance maps on disk, in shards.

Images: every .jpg .jpeg .png .bmp .webp under --data (recursively, sorted).  With the
torchvision ImageFolder layout (DATA/<class>/<image>) the sorted sub-folder names are
the classes and give each image its label (needed for --targets label).  Each image is
converted to RGB, its shorter side resized to --resize, centre-cropped to --size and
normalised with --mean/--std (ImageNet statistics by default).  A file that cannot be
read is reported with a warning, recorded as skipped and the run goes on.

Model: a torchvision architecture name (e.g. resnet50, vgg16) with its weights from
--weights (a state dict saved with torch.save(model.state_dict(), PATH); without
--weights the model is randomly initialised), or package.module:function, a function
on the Python path returning a torch.nn.Module.

Output (OUT):
  run.json                  the settings; a re-run must use the same ones
  shards/shard-00000.npy    relevance maps, array (items, 3, size, size), float32
                            (float16 with --float16)
  shards/shard-00000.json   per item: image path, index, label, target, logit,
                            relevance sum and delta = relevance sum - logit
  index.jsonl               all shards' items (and skipped images) in order, one
                            JSON object per line
Shard k holds the images [k*N, (k+1)*N) for --shard-size N.  A shard is finished when
its .json exists (files are written atomically), so an interrupted run is resumed by
running the same command again: finished shards are skipped.  Under torchrun
(torchrun --nproc-per-node G -m relprop.cli attribute ...) shard k is done by process
k % G.  With --targets topk:K or a list, every image gives one item per target.
"""

ATTRIBUTE_EXAMPLES = """\
examples:
  relprop attribute --data imagenet/val --model resnet50 --weights resnet50.pth \\
      --method rap --out attributions/
  relprop attribute --data imgs/ --model mypkg.models:build --method lrp-epsilon \\
      --param epsilon=0.01 --targets topk:3 --batch-size 16 --float16 --out out/
  torchrun --nproc-per-node 4 -m relprop.cli attribute --data imgs/ --model vgg16 \\
      --weights vgg16.pth --method rsp --out out/
"""

EXPLAIN_DESCRIPTION = """\
Explain a few image files and write, for every image and target class,
  OUT/<image name>-<class>-heatmap.png   the relevance map (red = positive relevance,
                                         blue = negative, white = 0; summed over colours)
  OUT/<image name>-<class>-overlay.png   the (preprocessed) image blended with the map
Preprocessing and the model spec are as for 'relprop attribute' (see its --help).
The predicted class is explained unless --target is given.
"""

EXPLAIN_EXAMPLES = """\
examples:
  relprop explain cat.jpg dog.png --model resnet50 --weights resnet50.pth --method rap -o maps/
  relprop explain img.png --model mypkg.models:build --method ae --param ratio=2 --target 3,7 -o maps/
"""


def _add_model_options(p) -> None:
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="torchvision architecture name (e.g. resnet50) or package.module:function "
                        "returning a torch.nn.Module")
    p.add_argument("--weights", metavar="PATH", help="state dict to load into the model (strict; without it a "
                                                     "torchvision model keeps random weights)")
    p.add_argument("--num-classes", type=_positive, metavar="N",
                   help="number of classes to build the model with (default: the model's own default)")
    p.add_argument("--method", default="rap", metavar="METHOD",
                   help="attribution method, see 'relprop methods' (default: %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable, e.g. --param epsilon=0.01 (values are Python literals)")
    p.add_argument("--size", type=_positive, default=224, metavar="PX",
                   help="centre-crop size in pixels (default: %(default)s)")
    p.add_argument("--resize", type=_positive, default=256, metavar="PX",
                   help="shorter side is resized to this before cropping, >= --size (default: %(default)s)")
    p.add_argument("--mean", default="0.485,0.456,0.406", metavar="R,G,B",
                   help="normalisation mean (default: ImageNet, %(default)s)")
    p.add_argument("--std", default="0.229,0.224,0.225", metavar="R,G,B",
                   help="normalisation standard deviation (default: ImageNet, %(default)s)")


def _add_attribute_parser(sub, fmt) -> None:
    p = sub.add_parser("attribute", help="attribute a whole image folder into resumable shards on disk",
                       description=ATTRIBUTE_DESCRIPTION, epilog=ATTRIBUTE_EXAMPLES, formatter_class=fmt)
    p.add_argument("--data", required=True, metavar="DIR", help="image folder (searched recursively)")
    _add_model_options(p)
    p.add_argument("--targets", default="predicted", metavar="T",
                   help="classes to explain per image: predicted, label (ImageFolder layout), topk:K "
                        "(the K highest-scoring classes) or a list like 1,5,7 (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="N",
                   help="images per batch (default: %(default)s)")
    p.add_argument("--shard-size", type=_positive, default=1024, metavar="N",
                   help="images per shard file (default: %(default)s)")
    p.add_argument("--float16", action="store_true", help="store the relevance as float16 (half the disk space)")
    p.add_argument("--workers", type=_non_negative, default=0, metavar="N",
                   help="image-loading worker processes (default: %(default)s, load in the main process)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, created if missing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(subparser=p)


def _add_explain_parser(sub, fmt) -> None:
    p = sub.add_parser("explain", help="write heatmap and overlay PNGs for a few image files",
                       description=EXPLAIN_DESCRIPTION, epilog=EXPLAIN_EXAMPLES, formatter_class=fmt)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model_options(p)
    p.add_argument("--target", metavar="C[,C...]", help="class index or comma-separated indices "
                                                         "(default: the predicted class)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder, created if missing")
    p.set_defaults(subparser=p)


def _params(parser, items) -> dict:
    import ast

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--param: expected KEY=VALUE, got {item!r}")
        try:
            params[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key.strip()] = value
    return params


def _floats3(parser, name, text) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        parser.error(f"--{name}: expected three comma-separated numbers, got {text!r}")
    return values


def _check_common(args):
    """Validate method, parameters, preprocessing, output folder and model; returns (model, params, mean, std)."""
    from . import methods
    from .explainer import available_methods
    from .images import load_model

    parser = args.subparser
    if args.method not in available_methods():
        parser.error(f"--method: unknown method {args.method!r}; choose one of: {', '.join(available_methods())}")
    params = _params(parser, args.param)
    try:
        methods.create(args.method, **params)
    except (TypeError, ValueError) as e:
        parser.error(f"--param: {e}")
    if args.resize < args.size:
        parser.error(f"--resize ({args.resize}) must be >= --size ({args.size})")
    mean, std = _floats3(parser, "mean", args.mean), _floats3(parser, "std", args.std)
    if any(s <= 0 for s in std):
        parser.error("--std: values must be > 0")
    _check_writable(parser, "--out", args.out)
    try:
        model = load_model(args.model, args.weights, args.num_classes)
    except ValueError as e:
        parser.error(f"--model/--weights: {e}")
    return model, params, mean, std


def _attribute(args) -> int:
    from .attribute import attribute_dataset, parse_targets
    from .images import ImageFolderDataset

    parser = args.subparser
    try:
        parse_targets(args.targets)
    except ValueError as e:
        parser.error(f"--targets: {e}")
    try:
        dataset = ImageFolderDataset(args.data, size=args.size, resize=args.resize)
    except (OSError, ValueError) as e:
        parser.error(f"--data: {e}")
    if args.targets == "label" and dataset.labels is None:
        parser.error("--targets label needs the ImageFolder layout: DATA/<class>/<image>, every image in a "
                     "class sub-folder")
    model, params, mean, std = _check_common(args)
    dataset.mean, dataset.std = mean, std
    extra = {"model_spec": args.model, "weights": os.path.abspath(args.weights) if args.weights else None}
    try:
        summary = attribute_dataset(model, dataset, args.method, params, args.out, targets=args.targets,
                                    batch_size=args.batch_size, shard_size=args.shard_size,
                                    dtype="float16" if args.float16 else "float32", num_workers=args.workers,
                                    progress=not args.quiet, extra_settings=extra)
    except ValueError as e:
        print(f"relprop attribute: error: {e}", file=sys.stderr)
        return 2
    if "items" in summary:
        print(f"{summary['shards']} shards ({summary['done']} computed now, {summary['skipped_shards']} "
              f"already done): {summary['items']} items, {summary['skipped_images']} unreadable images "
              f"skipped; index: {os.path.join(args.out, 'index.jsonl')}")
    return 0


def _explain(args) -> int:
    import io

    import numpy as np
    import torch
    from PIL import Image

    from . import viz
    from .explainer import Explainer
    from .images import ImageFolderDataset

    parser = args.subparser
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    targets = None
    if args.target is not None:
        try:
            targets = [int(t) for t in args.target.split(",")]
        except ValueError:
            parser.error(f"--target: expected class indices like 3 or 3,7, got {args.target!r}")
    model, params, mean, std = _check_common(args)
    pre = ImageFolderDataset.__new__(ImageFolderDataset)
    pre.size, pre.resize, pre.mean, pre.std = args.size, args.resize, mean, std
    images = []
    for path in args.images:
        try:
            images.append(pre.load(path))
        except Exception as e:
            parser.error(f"cannot read image {path!r}: {type(e).__name__}: {e}")
    explainer = Explainer(model, args.method, **params)
    x = torch.stack(images)
    for path, xi in zip(args.images, x):
        xi = xi[None]
        ts = targets if targets is not None else [None]
        try:
            att = explainer.attribute(xi.repeat(len(ts), 1, 1, 1), None if targets is None else ts)
        except ValueError as e:
            parser.error(str(e))
        rgb = viz.image_to_rgb(xi[0], mean, std)
        stem = os.path.splitext(os.path.basename(path))[0]
        for r, t in zip(att.relevance, att.target.tolist()):
            heat = viz.to_rgb(r.sum(0))
            overlay = (0.5 * rgb.astype(np.float32) + 0.5 * heat.astype(np.float32) + 0.5).astype(np.uint8)
            for suffix, arr in (("heatmap", heat), ("overlay", overlay)):
                buf = io.BytesIO()
                Image.fromarray(arr, "RGB").save(buf, format="PNG")
                out = os.path.join(args.out, f"{stem}-{t}-{suffix}.png")
                viz.write_atomic(out, buf.getvalue())
            print(f"{path}: class {t} (logit {att.logits[0, t].item():.3f}) -> "
                  f"{os.path.join(args.out, f'{stem}-{t}-heatmap.png')}, -overlay.png")
    return 0


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
