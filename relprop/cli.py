"""The ``relprop`` command line: ``relprop evaluate``, ``explain``, ``attribute``, ``demo``, ``methods``, ``backends``."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

from .images import IMAGE_EXTENSIONS, INTERPOLATIONS, Preprocessing

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
  relprop evaluate                          score every method on the built-in benchmark (report folder)
  relprop evaluate --voc VOC2012/ --model resnet50 --weights resnet50.pth
                                            the same metrics on your annotated images
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


def _check_output_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """Stop with a usage error naming ``flag`` unless ``folder`` is a writable folder or can be
    created as one; creates nothing (the command creates it once everything is validated)."""
    path = os.path.abspath(folder)
    existing = path
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.error(f"{flag}: cannot write to output folder {folder!r}: {existing!r} is not a folder")
    if existing == path:
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            parser.error(f"{flag}: cannot write to output folder {folder!r}: {e.strerror or e}")
    elif not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"{flag}: cannot write to output folder {folder!r}: cannot create folders in {existing!r}")


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

    _add_evaluate_parser(sub, fmt)
    _add_attribute_parser(sub, fmt)
    _add_explain_parser(sub, fmt)
    sub.add_parser("methods", help="list the attribution methods, a line each, with their parameters",
                   description="List every method name accepted by relprop.Explainer(model, method=...) "
                               "and by 'relprop demo --methods', with its parameters and their defaults "
                               "(set them with --param KEY=VALUE in 'explain' and 'attribute', or as "
                               "keywords of relprop.Explainer).",
                   epilog="example:\n  relprop methods", formatter_class=fmt)
    backends = sub.add_parser(
        "backends", help="show which compute backends (torch, triton, cuda) are available and why not",
        description="Show each compute backend relprop can run on, whether it is usable on this machine and, if "
                    "not, why.  'auto' (the default) picks, for CUDA tensors, the compiled extension, then Triton, "
                    "whichever is available and first passes its self-check (its primitives run on a small conv "
                    "and linear case against the torch reference on the device, once per process), and the "
                    "torch reference for CPU tensors.",
        epilog="examples:\n  relprop backends\n  relprop backends --check", formatter_class=fmt)
    backends.add_argument("--check", action="store_true",
                          help="run each available fast backend's self-check per primitive and dtype (float32, "
                               "float64, float16, bfloat16) on this machine's device (CUDA if torch sees a GPU, "
                               "else CPU: the op library's CPU kernels, Triton under TRITON_INTERPRET=1) and print "
                               "the result of every case; exit status 1 if a check failed")
    return parser


def main(argv=None) -> int:
    """Entry point of the ``relprop`` console script; returns the exit status.  A reader that
    closes standard output early (``relprop methods | head -1``) ends the command quietly with
    141, a shell's status for SIGPIPE, as git and coreutils do, instead of a traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        try:   # Python flushes stdout at exit: point it at nothing, so that raises no second error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


def _main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "methods":
        return _methods()
    if args.command == "backends":
        return _backends(args.check)
    # Warnings are for the user: one line each, without Python's file and source line.  Only the
    # text is changed (formatwarning), so callers that record warnings still get them.
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *a, **k: f"relprop {args.command}: warning: {message}\n"
    try:
        return _run_command(args)
    finally:
        warnings.formatwarning = formatwarning


def _run_command(args) -> int:
    run = {"attribute": _attribute, "explain": _explain, "evaluate": _evaluate}.get(args.command, _demo)
    try:
        return run(args)
    except KeyboardInterrupt:         # Ctrl-C: one line, no traceback; files are written whole or not at all
        note = "; finished shards are kept: run the same command again to resume" \
            if args.command == "attribute" else ""
        print(f"relprop {args.command}: interrupted{note}", file=sys.stderr)
        return 130


def _methods() -> int:
    from .explainer import available_methods

    methods = available_methods()
    width = max(map(len, methods))
    for name, summary in methods.items():
        print(f"{name:<{width}}  {summary}")
        params = method_parameters(name)
        if params:
            listed = ", ".join(f"{k}={v!r}" for k, v in params.items())
            print(f"{'':<{width}}  parameters (--param KEY=VALUE): {listed}")
    return 0


def method_parameters(name: str) -> dict:
    """A method's parameters and their defaults (what ``--param KEY=VALUE`` sets)."""
    import inspect

    from .methods import METHODS
    sig = inspect.signature(METHODS[name].__init__)
    return {k: p.default for k, p in sig.parameters.items() if k != "self"}


def _backends(check: bool) -> int:
    import torch

    from .ops.dispatch import BACKENDS, default_device, self_check, unavailable

    device = default_device()
    failed = False
    for name in BACKENDS:
        reason = unavailable(name, device)
        state = "available" if reason is None else f"unavailable: {reason}"
        print(f"{name:<7} {state}")
        if not check or reason is not None:
            continue
        if name == "torch":
            print("        the reference: nothing to check")
            continue
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            result = self_check(name, device, dtype)
            failed |= not result.passed
            print(f"        {device.type} {str(dtype).removeprefix('torch.')}: {result.verdict}")
            for case, verdict in result.results.items():
                print(f"          {case:<44} {verdict}")
    return 1 if failed else 0


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


MODEL_HELP = """\
MODEL (--model), one of:
  shapes-vgg, shapes-resnet,  relprop's built-in classifiers of the synthetic shapes
  shapes-convnext, shapes-vit benchmark (trained weights included; 10 classes; two
                              ReLU/BatchNorm CNNs, a ConvNeXt and a vision transformer);
                              preprocessing: 64x64, the benchmark's mean/std
  a torchvision architecture  resnet50, vgg16, densenet121...  --weights is a state dict
                              file (torch.save(model.state_dict(), PATH)) or a
                              torchvision weights name (IMAGENET1K_V1, DEFAULT or
                              ResNet50_Weights.IMAGENET1K_V1) whose file is already in
                              the torch hub cache, $TORCH_HOME/hub/checkpoints/ (default
                              ~/.cache/torch/hub/checkpoints/; nothing is downloaded);
                              without --weights the weights are random.  Preprocessing:
                              the weights' own for a weights name, else ImageNet
                              (resize 256, crop 224, ImageNet mean/std)
  package.module:function     a function on the Python path returning a
                              torch.nn.Module (called with num_classes=N for
                              --num-classes N); ImageNet preprocessing.  An error
                              raised by it or by importing its module is one line
                              naming it.  torchvision's builders are called with
                              weights_backbone=None (nothing is downloaded)
--size alone keeps the model's resize/crop ratio.
"""

ATTRIBUTE_DESCRIPTION = """\
Attribute every image of a data set and store the relevance maps on disk, in shards.

Data, one of:
  --data DIR           every {extensions} under DIR (recursively, sorted).
                       With the torchvision ImageFolder layout (DIR/<class>/<image>) the
                       sorted sub-folder names are the classes and give each image its
                       label (for --targets label).
  --dataset NAME       a torchvision.datasets class: FakeData (random images, no files)
                       or CIFAR10, MNIST, ImageNet... already on disk under --data ROOT
                       (never downloaded: a missing data set is an error saying how to
                       get it); constructor options with --dataset-option, e.g.
                       --dataset-option train=False or split='val'.
Each image is turned upright by its EXIF orientation, converted to RGB (16-bit
greyscale as value/65535, float images as values in [0, 1]), its shorter side resized
to --resize, centre-cropped to --size and normalised with --mean/--std; the defaults
are the model's own (see MODEL below).  An image that cannot be read is reported with a warning, recorded as
skipped, and the run goes on (a data set none of whose images can be read is an
error).  Symbolic links to folders are followed, each real folder once.

Before anything is written, the first readable image is explained with --method and
--param, and --targets is checked against the model's number of classes: a bad
parameter value, a class index or topk:K beyond the model's classes is an error that
leaves OUT untouched.

""" + MODEL_HELP + """
Output (OUT):
  run.json                  the settings; a re-run must use the same ones
  shards/shard-00000.npy    relevance maps: a numpy array (items, 3, size, size),
                            float32 (float16 with --float16); read it with np.load
  shards/shard-00000.json   {"shard", "first", "stop", "rank", "settings", "dtype",
                            "shape", "bytes", "sha256", "items": [...],
                            "skipped": [...]}, written last: a shard is finished
                            when its .json exists and its .npy has the recorded
                            size, shape, dtype and sha256
  index.jsonl               every shard's items, then its skipped images, shard by
                            shard, one JSON object per line; written when every
                            shard is finished
Index columns (one line per image and target):
  shard, row       the map is row `row` of shards/shard-<shard>.npy
  index            position of the image in the data set (sorted order)
  id               stable name: path relative to --data, or NAME[options]:index
  path             the image file relative to --data (null for a torchvision
                   data set)
  label            the data set's class of the image (null without labels)
  target           the class explained
  logit            the model's output for that class
  relevance_sum    the sum of the relevance map (float32)
  delta            relevance_sum - logit (conservation error)
  error_estimate   the map's estimated relative error (README, Numerics)
  reported         true if that is above the trusted bound: the map may be
                   numerically untrustworthy (one warning for the run counts them)
  dtype            the dtype of the shard's .npy (float16 or float32)
  skipped, error   instead of the above for an image that could not be read
Shard k holds the images [k*N, (k+1)*N) for --shard-size N.  Every file is written
under a temporary name, flushed to disk and renamed (atomic), so an interrupted run
(Ctrl-C, a crash, a full disk) is resumed by running the same command again: finished
shards are kept, at most the shards in flight are recomputed.  A finished shard whose
files are damaged (a .json empty or corrupt, a .npy missing, truncated or failing its
checksum) is computed again, with a warning naming the file; temporary files of dead
runs are removed.  An empty or corrupt run.json is an error: delete it and run the
command again.  Write errors and Ctrl-C end with one line naming the problem, exit
status 1 (130 for Ctrl-C), and the finished shards kept.  With --float16, a shard
holding a value beyond float16's range (|R| > 65504) is stored as float32 instead,
with a warning, and says so in its .json and index lines (dtype).  With --targets
topk:K or a list every image gives one item per target, all computed in one batched
pass.  On a GPU, out-of-memory halves the items per pass (with a warning) and
retries.  The progress bar shows images/s and the ETA.

Several processes: torchrun --nproc-per-node G -m relprop.cli attribute ... (or
several nodes) splits the shards across the processes (shard k by rank k % G, one GPU
each); each writes its own shards and rank 0 writes index.jsonl at the end and prints
the summary, which counts the shards of every rank.  If one rank fails, all stop
within a shard with an error naming the failed rank and the cause, and the job exits
non-zero; the finished shards are kept for a resume.
"""

ATTRIBUTE_EXAMPLES = """\
examples:
  relprop attribute --data imagenet/val --model resnet50 --weights IMAGENET1K_V2 \\
      --method rap --out attributions/
  relprop attribute --data imgs/ --model mypkg.models:build --method lrp-epsilon \\
      --param epsilon=0.01 --targets topk:3 --batch-size 16 --float16 --out out/
  relprop attribute --dataset CIFAR10 --data ~/data/cifar --dataset-option train=False \\
      --model mypkg.cifar:net --weights cifar.pth --size 32 --targets label --out cifar/
  relprop attribute --dataset FakeData --dataset-option size=100 --model shapes-vgg --out fake/
  torchrun --nproc-per-node 4 -m relprop.cli attribute --data imgs/ --model vgg16 \\
      --weights vgg16.pth --method rsp --out out/
"""

EXPLAIN_DESCRIPTION = """\
Explain a few image files and write, for every image and target class,
  OUT/<image name>-<class>-heatmap.png   the relevance map (red = positive relevance,
                                         blue = negative, white = 0; summed over colours)
  OUT/<image name>-<class>-overlay.png   the (preprocessed) image blended with the map
and print each image's class, logit and files.  <image name> is the file name without
its extension; images that share it (a/x.png, b/x.png) are named by their path from
their common folder instead (a_x, b_x), so no output overwrites another.  Nothing is
written unless every image is read and explained.  The predicted class is explained
unless --target says otherwise (topk:K, or class indices).  Each image is turned
upright by its EXIF orientation, converted to RGB (16-bit greyscale as value/65535,
float images as values in [0, 1]), its shorter side resized to --resize,
centre-cropped to --size and normalised with --mean/--std; the defaults are the
model's own (see MODEL below).

""" + MODEL_HELP

EXPLAIN_EXAMPLES = """\
examples:
  relprop explain cat.jpg dog.png --model resnet50 --weights resnet50.pth --method rap -o maps/
  relprop explain cat.jpg --model vgg16 --weights DEFAULT --target 281,285 -o maps/
  relprop explain shape.png --model shapes-resnet --method rsp -o maps/
  relprop explain img.png --model mypkg.models:build --method ae --param ratio=2 --target 3,7 -o maps/
"""


def _add_model_options(p) -> None:
    """--model, --weights, --num-classes, --method, --param and the preprocessing options."""
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="a built-in model (shapes-vgg, shapes-resnet, shapes-convnext, shapes-vit), a "
                        "torchvision architecture name (e.g. resnet50) or package.module:function returning a "
                        "torch.nn.Module (see MODEL above)")
    p.add_argument("--weights", metavar="PATH|NAME",
                   help="state dict file to load into the model (strict), or for a torchvision model a weights "
                        "name such as IMAGENET1K_V1 or DEFAULT, read from the torch hub cache (without it a "
                        "torchvision model keeps random weights)")
    p.add_argument("--num-classes", type=_positive, metavar="N",
                   help="number of classes to build the model with (default: the model's own default)")
    p.add_argument("--method", default="rap", metavar="METHOD",
                   help="attribution method, see 'relprop methods' (default: %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, repeatable, e.g. --param epsilon=0.01 (values are Python literals: "
                        "numbers, True/False, 'text', tuples; anything else is kept as text)")
    p.add_argument("--size", type=_positive, metavar="PX",
                   help="centre-crop size in pixels (default: the model's, 224 for ImageNet models, 64 for shapes-*)")
    p.add_argument("--resize", type=_positive, metavar="PX",
                   help="shorter side is resized to this before cropping, >= --size (default: the model's, "
                        "256 for ImageNet models, 64 for shapes-*)")
    p.add_argument("--mean", metavar="R,G,B", help="normalisation mean (default: the model's, e.g. ImageNet "
                                                   "0.485,0.456,0.406)")
    p.add_argument("--std", metavar="R,G,B", help="normalisation standard deviation (default: the model's, "
                                                  "e.g. ImageNet 0.229,0.224,0.225)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize interpolation (default: the model's, "
                                                                   "usually bilinear)")


def _add_evaluate_parser(sub, fmt) -> None:
    from . import evaluate

    p = sub.add_parser("evaluate", help="score the methods on a localisation benchmark, write a report folder",
                       description=evaluate.DESCRIPTION, epilog=evaluate.EXAMPLES, formatter_class=fmt)
    evaluate.add_arguments(p)
    p.set_defaults(subparser=p)


def _evaluate(args) -> int:
    from . import evaluate

    return evaluate.command(args, args.subparser)


def _add_attribute_parser(sub, fmt) -> None:
    p = sub.add_parser("attribute", help="attribute a whole data set into resumable shards on disk",
                       description=ATTRIBUTE_DESCRIPTION.replace("{extensions}", " ".join(IMAGE_EXTENSIONS)), epilog=ATTRIBUTE_EXAMPLES, formatter_class=fmt)
    p.add_argument("--data", metavar="DIR", help="image folder (searched recursively), or the folder of --dataset")
    p.add_argument("--dataset", metavar="NAME", help="a torchvision.datasets class (FakeData, CIFAR10, MNIST, "
                                                     "ImageNet...) instead of an image folder; never downloaded")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a --dataset constructor option, repeatable, e.g. train=False, split='val', size=100 "
                        "(values are Python literals)")
    _add_model_options(p)
    p.add_argument("--targets", "--target", dest="targets", default="predicted", metavar="T",
                   help="classes to explain per image (--target is the same option): predicted, label (ImageFolder layout), topk:K "
                        "(the K highest-scoring classes) or a list like 1,5,7 (default: %(default)s)")
    p.add_argument("--batch-size", type=_batch_size, default=32, metavar="N",
                   help="images per batch, or 'auto': the largest that fits, from the measured memory of one "
                        "image and the memory free now (printed, and recorded in run.json) (default: %(default)s)")
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
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (not folders: relprop attribute --data DIR explains a whole folder)")
    _add_model_options(p)
    p.add_argument("--target", "--targets", dest="target", metavar="T",
                   help="classes to explain per image, as attribute's --targets: predicted (the default), topk:K "
                        "(the K highest-scoring classes) or class indices like 3 or 3,7 (--targets is the same "
                        "option)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder, created if missing")
    p.set_defaults(subparser=p)


def _params(parser, items, flag: str = "--param", json_only: bool = False) -> dict:
    """``KEY=VALUE`` items -> dict.  A value is a Python literal (``0.01``, ``1e-9``, ``2``,
    ``True``, ``'text'``, ``(3, 64, 64)``), or ``nan``/``inf`` as floats; anything else is
    the text itself, as is a literal that is not a JSON value when ``json_only``."""
    import ast

    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            parser.error(f"{flag}: expected KEY=VALUE, got {item!r}")
        if key in params:
            parser.error(f"{flag}: {key} is given twice")
        try:
            value = ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            value = float(text) if text.lower().lstrip("+-") in ("nan", "inf", "infinity") else text
        params[key] = value if not json_only or _is_json(value) else text
    return params


def _is_json(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _floats3(parser, name, text) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        parser.error(f"--{name}: expected three comma-separated numbers, got {text!r}")
    return values


def _declared_text(method: str, key: str) -> bool:
    """The method's parameter ``key`` is annotated ``str`` or ``str | None``."""
    import inspect

    from .methods import METHODS
    p = inspect.signature(METHODS[method].__init__).parameters.get(key)
    return p is not None and str(p.annotation).replace(" ", "") in ("str", "str|None", "Optional[str]")


def method_params_from_args(args) -> dict:
    """Check --method and --param (usage error if bad); the method parameters."""
    from . import methods
    from .explainer import available_methods

    parser = args.subparser
    if args.method not in available_methods():
        parser.error(f"--method: unknown method {args.method!r}; choose one of: {', '.join(available_methods())}")
    params = _params(parser, args.param, json_only=True)
    # A parameter declared as text (a layer name such as init_layer) keeps the text as typed:
    # the built-in VGG's layers are named "0.10", which would otherwise read as the float 0.1.
    raw = {item.partition("=")[0].strip(): item.partition("=")[2].strip() for item in args.param}
    for key, value in params.items():
        if value is not None and not isinstance(value, str) and _declared_text(args.method, key):
            params[key] = raw[key]
    try:
        methods.create(args.method, **params)
    except (TypeError, ValueError) as e:
        parser.error(f"--param: {e}")
    return params


def model_error(e: ValueError) -> str:
    """The usage-error text for :func:`relprop.models.load_model`'s ValueError ``e``: ``--model
    SPEC raised TYPE: message`` for a model function that raised, else ``--model/--weights: ...``."""
    from .models import ModelFunctionError

    return f"--model {e}" if isinstance(e, ModelFunctionError) else f"--model/--weights: {e}"


def load_model_from_args(args):
    """The options of :func:`_add_model_options` -> ``(model, Preprocessing)`` (usage error if bad).

    The preprocessing is the model's own (:func:`relprop.models.load_model`) with the
    options given overriding it; ``--size`` alone keeps the model's resize/crop ratio.
    """
    from .models import load_model

    parser = args.subparser
    mean = None if args.mean is None else _floats3(parser, "mean", args.mean)
    std = None if args.std is None else _floats3(parser, "std", args.std)
    try:
        model, default = load_model(args.model, args.weights, args.num_classes)
    except ValueError as e:
        parser.error(model_error(e))
    size = args.size or default.size
    resize = args.resize
    if resize is None and default.resize is not None:
        resize = max(size, round(size * default.resize / default.size))
    try:
        pre = Preprocessing(size, resize, mean or default.mean, std or default.std,
                            args.interpolation or default.interpolation)
    except ValueError as e:
        parser.error(f"--size/--resize/--mean/--std: {e}")
    return model, pre


def _dataset_from_args(args, preprocessing):
    from .images import ImageFolderDataset, TorchvisionDataset

    parser = args.subparser
    if args.dataset is None and args.data is None:
        parser.error("--data: give an image folder, or --dataset NAME (with --data ROOT if it has files)")
    if args.dataset is None and args.dataset_option:
        parser.error("--dataset-option needs --dataset")
    try:
        if args.dataset is None:
            return ImageFolderDataset(args.data, preprocessing)
        options = _params(parser, args.dataset_option, "--dataset-option")
        return TorchvisionDataset(args.dataset, args.data, preprocessing, options)
    except (OSError, ValueError) as e:
        parser.error(f"--{'dataset' if args.dataset else 'data'}: {e}")


def _attribute(args) -> int:
    from .attribute import DistributedRunError, attribute_dataset, parse_targets
    from .graph import UnsupportedModelError

    parser = args.subparser
    try:
        parse_targets(args.targets)
    except ValueError as e:
        parser.error(f"--targets: {e}")
    params = method_params_from_args(args)
    _check_output_folder(parser, "--out", args.out)
    model, pre = load_model_from_args(args)
    dataset = _dataset_from_args(args, pre)
    if args.targets == "label" and dataset.labels is None:
        parser.error("--targets label needs labels: an image folder in the ImageFolder layout DATA/<class>/<image> "
                     "(every image in a class sub-folder), or a --dataset with integer labels")
    weights = args.weights
    if weights is not None and os.path.exists(weights):
        weights = os.path.abspath(weights)
    extra = {"model_spec": args.model, "weights": weights}
    try:
        summary = attribute_dataset(model, dataset, args.method, params, args.out, targets=args.targets,
                                    batch_size=args.batch_size, shard_size=args.shard_size,
                                    dtype="float16" if args.float16 else "float32", num_workers=args.workers,
                                    progress=not args.quiet, extra_settings=extra)
    except UnsupportedModelError as e:      # the model's fault, found before anything is written
        parser.error(f"--model {args.model}: {e}")
    except ValueError as e:                 # bad settings, targets, parameters or data: nothing was written
        print(f"relprop attribute: error: {e}", file=sys.stderr)
        return 2
    except (DistributedRunError, OSError) as e:   # write errors (OutputError) name the file and what to do
        print(f"relprop attribute: error: {e}", file=sys.stderr)
        return 1
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
    from .explainer import Explainer, reported_maps_quiet, trusted_error
    from .graph import UnsupportedModelError

    parser = args.subparser
    folders = [p for p in args.images if os.path.isdir(p)]
    if folders:     # not expanded: explain holds every image and map in memory and writes two PNGs per image
        parser.error(f"{folders[0]!r} is a folder{f' (and {len(folders) - 1} more)' if len(folders) > 1 else ''}; "
                     f"explain takes image files (e.g. {os.path.join(folders[0], '*.png')}); to explain every image "
                     f"of a folder use: relprop attribute --data {folders[0]} --out DIR")
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        parser.error(f"image file(s) not found: {', '.join(missing)}")
    from .attribute import parse_targets
    try:                                    # attribute's --targets forms, but labels (no data set here)
        kind, tvalue = parse_targets("predicted" if args.target is None else args.target)
    except ValueError as e:
        parser.error(f"--target: {e}")
    if kind == "label":
        parser.error("--target: label needs a data set with labels: use relprop attribute --data DIR --targets label")
    params = method_params_from_args(args)
    _check_output_folder(parser, "--out", args.out)
    model, pre = load_model_from_args(args)
    paths, seen = [], set()
    for path in args.images:                # a file given twice is explained once
        if os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            paths.append(path)
    images = []
    for path in paths:
        try:
            images.append(pre.load(path))
        except Exception as e:
            parser.error(f"cannot read image {path!r}: {type(e).__name__}: {e}")
    try:
        explainer = Explainer(model, args.method, **params)
    except UnsupportedModelError as e:   # the model's fault, not the method's
        parser.error(f"--model {args.model}: {e}")
    except (TypeError, ValueError) as e:
        parser.error(f"--method/--param: {e}")
    x = torch.stack(images)
    try:
        with torch.no_grad():    # a dense output has no classes to take --target from: refuse it first
            logits = explainer.graph.forward(x[:1] if kind != "topk" else x,   # topk: every image's classes
                                             drop=frozenset(range(1, len(explainer.graph.nodes) - 1)))[-1]
    except ValueError as e:      # an input the model cannot take (the layer that refused it)
        parser.error(str(e))
    if logits.ndim != 2:
        from .attribute import dense_output_refusal
        parser.error(dense_output_refusal("explain", logits.shape))
    classes = logits.shape[1]
    if kind == "list" and max(tvalue) >= classes:
        parser.error(f"--target: class {max(tvalue)} is out of range: the model has {classes} classes "
                     f"(0 to {classes - 1})")
    if kind == "topk" and tvalue > classes:
        parser.error(f"--target: topk:{tvalue}: the model has only {classes} classes")
    results = []                 # every image is explained before any file is written
    for j, (path, xi) in enumerate(zip(paths, x)):
        xi = xi[None]
        ts = (tvalue if kind == "list" else logits[j].topk(tvalue).indices.tolist() if kind == "topk"
              else [None])
        try:
            with reported_maps_quiet():        # said below with the image's name
                att = explainer.attribute(xi.repeat(len(ts), 1, 1, 1), None if ts == [None] else ts)
        except ValueError as e:
            parser.error(str(e))
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError) as e:
            parser.error(f"method {args.method!r} fails on {path}: {type(e).__name__}: {e}")
        off = att.error > trusted_error(xi.dtype)
        if off.any():
            warnings.warn(f"{path}: the map(s) for class(es) {att.target[off].tolist()} may be numerically "
                          f"untrustworthy (estimated relative error up to ~{att.error.max().item():.0e}; README, "
                          "Numerics)", RuntimeWarning, stacklevel=2)
        results.append((path, xi, att))
    lines = []
    for (path, xi, att), stem in zip(results, _output_stems(paths)):
        rgb = viz.image_to_rgb(xi[0], pre.mean, pre.std)
        for r, t in zip(att.relevance, att.target.tolist()):
            heat = viz.to_rgb(r.sum(0))
            overlay = (0.5 * rgb.astype(np.float32) + 0.5 * heat.astype(np.float32) + 0.5).astype(np.uint8)
            for suffix, arr in (("heatmap", heat), ("overlay", overlay)):
                buf = io.BytesIO()
                Image.fromarray(arr, "RGB").save(buf, format="PNG")
                out = os.path.join(args.out, f"{stem}-{t}-{suffix}.png")
                try:
                    os.makedirs(args.out, exist_ok=True)
                    viz.write_atomic(out, buf.getvalue())
                except OSError as e:
                    print(f"relprop explain: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
                    return 1
            lines.append(f"{path}: class {t} (logit {att.logits[0, t].item():.3f}) -> "
                         f"{os.path.join(args.out, f'{stem}-{t}-heatmap.png')}, -overlay.png")
    for line in lines:     # once every file is written: a reader gone early cannot stop the writing
        print(line)
    return 0


def _output_stems(paths) -> list:
    """A distinct output name per image file (compared case-insensitively, for case-insensitive
    file systems): its file name without the extension; for files sharing that name, their
    path from their common folder with the separators as ``_`` (``a/x.png``, ``b/x.png`` ->
    ``a_x``, ``b_x``; ``x.png``, ``x.jpg`` -> ``x_png``, ``x_jpg``); ``~2``, ``~3``... if
    that still collides with another name."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    groups: dict = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem.casefold(), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        full = [os.path.abspath(paths[i]) for i in members]
        common = os.path.commonpath([os.path.dirname(f) for f in full])
        rel = [os.path.relpath(f, common) for f in full]
        names = [os.path.splitext(r)[0] for r in rel]
        if len({n.casefold() for n in names}) < len(names):
            names = [r.replace(".", "_") for r in rel]
        for i, name in zip(members, names):
            stems[i] = name.replace(os.sep, "_").replace("/", "_")
    taken, out = set(), []
    for stem in stems:
        name, k = stem, 1
        while name.casefold() in taken:
            k += 1
            name = f"{stem}~{k}"
        taken.add(name.casefold())
        out.append(name)
    return out


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


def _batch_size(text: str):
    return "auto" if text == "auto" else _positive(text)


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
