"""The ``relprop`` command line: ``relprop demo``, ``relprop methods``, ``relprop backends``."""
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
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.out):
            pass
    except OSError as e:
        parser.error(f"--out: cannot write to output folder {args.out!r}: {e.strerror or e}")

    summary = demo.run(args.out, methods=methods, images=args.images, seed=args.seed, steps=args.steps,
                       progress=not args.quiet)
    print(demo.format_summary(summary))
    return 1 if summary["failed"] else 0


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
