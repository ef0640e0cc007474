"""Cut the in-repository golden subset ``tests/data/golden/`` from the full golden set.

    python scripts/make_golden_subset.py                  # ../shared/golden -> tests/data/golden
    python scripts/make_golden_subset.py --golden DIR     # another copy of the *public* set

The full set (``../shared/golden``, 18 cases, 51 MB) sits beside the repository, not in it;
the subset lets the golden tests run from a clone alone.  It was made once with this script
and is checked against the full set by ``tests/test_golden.py`` whenever the full set is
present (``test_golden_subset_is_a_slice_of_the_full_set``), so it cannot drift.

How each subset file is derived from the full case of the same name (nothing is recomputed):

* **Cases**: :data:`CASES` -- one per method family of the golden README (rap-repository
  LRP, RAP, RSP, AE, Gu's CLRP, AGF-style CLRP and SGLRP) and between them every
  architecture (VGG16, VGG16-BN, Bottleneck ResNet, AlexNet).  The rap-repository LRP z+
  (alpha 1, beta 0) is the rule the AGF-style CLRP and SGLRP cases propagate with.
* **Samples**: the first sample of the batch only (``[:1]``) of every per-sample field:
  ``input``, ``target``, ``target_mode``, ``logits``, ``relevance`` and each map of
  ``extra_relevance``.  Every map of the golden README's methods is computed per sample
  for these cases (AE and RSP and Gu's CLRP cases already have B = 1), so the first
  sample's golden map is the official map for a batch of one.
* **Tensors**: stored as they are in the full case (float32 maps and weights, int64
  targets), bit for bit; slices are cloned so that only the kept sample is written.
* **Kept as they are**: every other field -- ``name``, ``set``, ``format_version``,
  ``method``, ``params``, ``arch``, ``seed``, the whole ``state_dict``, ``official``,
  ``versions``, ``notes`` and every tolerance field (``fp64_rel_l2``, ``stability_bound``,
  ``plain_logits_max_abs_diff``).  ``fp64_rel_l2`` is the full batch's noise floor, and the
  tests hold the first sample to it unchanged: relprop's float64 map of the first sample
  is within the float64 test's bound (1.5 x floor + 1e-7) for every case (measured when
  the subset was cut: at most 0.75 of the bound, on clrp_agf_vgg16).
* **Dropped** (:data:`DROPPED`): ``heatmap`` (= ``relevance.sum(dim=1, keepdim=True)``,
  derivable; the faithfulness test checks that it is) and ``intermediate`` (debugging aids;
  no test and not the checker read them).  Together with the second sample they are most
  of a full file: an input or a map of one 224x224 sample is 0.6 MB, a state dict 0.2-0.5 MB.
* **Added**: ``subset_of`` = the source file's name, SHA-256 and batch size, the samples
  kept, the fields dropped and this script's path.
* ``models.py`` is copied byte for byte; ``manifest.json`` lists the subset's cases in the
  full set's manifest format (plus ``subset_of``); ``README.md`` says what the folder is.

The files keep the golden file format, so the maintainers' checker runs on them too:
``python ../shared/golden/check.py --golden tests/data/golden --impl golden_adapter:explain
--pythonpath tests``.  Only the public set may be cut: the script refuses any case whose
``set`` is not ``"public"`` (the hidden set must never enter the repository).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = Path(os.environ.get("RELPROP_GOLDEN", ROOT.parent / "shared" / "golden"))
OUT = ROOT / "tests" / "data" / "golden"

#: case -> why it is in the subset
CASES = {
    "lrp_a2b1_resnet50": "rap-repository LRP alpha 2 beta 1 (beta > 0); ResNet: residual Add, downsample, BN",
    "rap_vgg16_bn": "RAP (one-hot entry, first-layer rule at the output, uniform shift); VGG16-BN",
    "rsp_vgg16": "RSP (Grad-CAM channel map at features.29, weight-gradient kernels); VGG16",
    "ae_r1_alexnet": "AE ratio 1 (maps sum to -1); AlexNet: overlapping 3x3/2 max-pools",
    "clrp1_gu_vgg16": "Gu's CLRP1 with its raw 'lrp' and 'dual' maps; constant z^B bounds, tied max-pools",
    "clrp_agf_vgg16": "AGF-style CLRP: rap-repository LRP z+ (alpha 1, beta 0) twice, scaled difference",
    "sglrp_agf_vgg16": "AGF-style SGLRP: softmax-gradient initial vectors, rap-repository LRP z+",
}
SAMPLES = 1                                 # keep input[:SAMPLES] etc.
PER_SAMPLE = ("input", "target", "target_mode", "logits", "relevance")   # + each extra_relevance map
#: field -> why it is not in the subset
DROPPED = {
    "heatmap": "relevance.sum(dim=1, keepdim=True), derivable",
    "intermediate": "debugging aids; no test and not check.py read them",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def first_samples(value, n=SAMPLES):
    """The first ``n`` samples of a per-sample field, as a fresh tensor / list."""
    if torch.is_tensor(value):
        return value[:n].clone()
    if isinstance(value, list):
        return list(value[:n])
    raise TypeError(f"per-sample field of type {type(value).__name__}")


def subset_case(case: dict, source: Path) -> dict:
    if case.get("set") != "public":
        raise SystemExit(f"{source}: set {case.get('set')!r}; only the public golden set may be cut into the repository")
    batch = int(case["input"].shape[0])
    out = {}
    for key, value in case.items():
        if key in DROPPED:
            continue
        if key in PER_SAMPLE:
            out[key] = first_samples(value)
        elif key == "extra_relevance":
            out[key] = {name: first_samples(v) for name, v in value.items()}
        else:
            out[key] = value
    out["subset_of"] = {"file": source.name, "sha256": sha256(source), "batch": batch,
                        "samples": list(range(min(SAMPLES, batch))), "dropped": sorted(DROPPED),
                        "made_by": "scripts/make_golden_subset.py"}
    return out


def manifest_entry(case: dict, path: Path, full_entry: dict) -> dict:
    entry = {key: full_entry[key] for key in ("file", "name", "method", "arch_family", "params")}
    entry.update(batch=int(case["input"].shape[0]), target=case["target"].tolist(), target_mode=case["target_mode"],
                 bytes=path.stat().st_size, fp64_rel_l2=case["fp64_rel_l2"],
                 relevance_sum=float(case["relevance"].double().sum()), subset_of=case["subset_of"])
    return entry


README = """\
# In-repository golden subset

{n} of the golden cases of `../shared/golden/` (the authors' official code on small nets),
cut by `scripts/make_golden_subset.py`, whose docstring says exactly how: the first sample
of each batch, tensors bit for bit as in the full case, every tolerance field kept,
`heatmap` and `intermediate` dropped, `subset_of` added.  `models.py` is the full set's,
byte for byte.  Do not edit these files: re-run the script.

The golden tests run on these cases always, and on every case of the full set when it is
present (`../shared/golden`, or `RELPROP_GOLDEN`); `tests/test_golden.py` then also checks
that each file here is an exact slice of its full case.

| case | method | arch | why |
|---|---|---|---|
{rows}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden", type=Path, default=DEFAULT_SOURCE, help="the full public golden set (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=OUT, help="where the subset goes (default: %(default)s)")
    args = ap.parse_args(argv)
    src = args.golden
    if not (src / "models.py").is_file() or not (src / "manifest.json").is_file():
        print(f"{src}: not a golden folder (no models.py / manifest.json); pass --golden", file=sys.stderr)
        return 2
    full_manifest = json.loads((src / "manifest.json").read_text())
    if full_manifest.get("set") != "public":
        print(f"{src}: set {full_manifest.get('set')!r}; only the public golden set may be cut", file=sys.stderr)
        return 2
    entries = {e["name"]: e for e in full_manifest["cases"]}
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("*.pt"):
        if stale.stem not in CASES:
            stale.unlink()
    manifest = {key: value for key, value in full_manifest.items() if key != "cases"}
    manifest["subset_of"] = {"folder": "../shared/golden", "cases": len(full_manifest["cases"]),
                             "samples": SAMPLES, "dropped": DROPPED, "made_by": "scripts/make_golden_subset.py"}
    manifest["cases"] = []
    rows = []
    for name, why in CASES.items():
        source = src / f"{name}.pt"
        case = subset_case(torch.load(source, weights_only=True), source)
        path = args.out / f"{name}.pt"
        torch.save(case, path)
        manifest["cases"].append(manifest_entry(case, path, entries[name]))
        rows.append(f"| `{name}` | {case['method']} | {case['arch']['family']}"
                    f"{'-bn' if case['arch'].get('batch_norm') else ''} | {why} |")
        print(f"{name:20s} B {case['subset_of']['batch']} -> {case['input'].shape[0]}  {path.stat().st_size / 1e6:5.2f} MB")
    shutil.copyfile(src / "models.py", args.out / "models.py")
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (args.out / "README.md").write_text(README.format(n=len(CASES), rows="\n".join(rows)))
    total = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"{len(CASES)} cases, {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
