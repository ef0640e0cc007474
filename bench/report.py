"""Turn pytest-benchmark JSON files (one run, or one per model) into a markdown table and a PNG plot.

    python bench/report.py bench/results/cpu-<date>.json [more.json ...] [--out bench/results/cpu-<date>]

Per case: images/s, median ms per batch, peak memory, ratio to the gradient pass of the
same group, ratio to relprop's own torch backend (the reference the kernels must beat) and
to Zennit's equivalent composite in the same group.
"""
import argparse
import json
import pathlib
from collections import defaultdict


def rows(data):
    out = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "batch" not in info or "peak_memory_bytes" not in info:
            continue
        out.append(dict(group=b["group"], impl=info["impl"], method=info["method"], batch=info["batch"],
                        model=info["model"], device=info["device"], median=b["stats"]["median"],
                        peak=info["peak_memory_bytes"]))
    return out


def table(rs):
    by_group = defaultdict(list)
    for r in rs:
        by_group[r["group"]].append(r)
    lines = []
    for group, items in by_group.items():
        grad = next((r["median"] for r in items if r["impl"] == "baseline" and r["method"] == "gradient"), None)
        zen = {r["method"]: r["median"] for r in items if r["impl"] == "zennit"}
        ref = {r["method"]: r["median"] for r in items if r["impl"] == "relprop-torch"}
        lines += [f"\n### {group}\n",
                  "| impl | method | images/s | median ms/batch | peak MiB | x gradient | x torch backend | x Zennit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(items, key=lambda r: (r["impl"] != "baseline", r["method"], r["impl"])):
            relprop = r["impl"].startswith("relprop")
            xg = f"{r['median'] / grad:.2f}" if grad else "-"
            xt = f"{r['median'] / ref[r['method']]:.2f}" if relprop and r["method"] in ref else "-"
            xz = f"{r['median'] / zen[r['method']]:.2f}" if relprop and r["method"] in zen else "-"
            lines.append(f"| {r['impl']} | {r['method']} | {r['batch'] / r['median']:.2f} | {1e3 * r['median']:.1f} "
                         f"| {r['peak'] / 2**20:.0f} | {xg} | {xt} | {xz} |")
    return "\n".join(lines)


def memory_lines(data):
    lines = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if "held_first10" in info:
            lines.append(f"\n### {b['group']}: {info['method']}\n\nmemory held after calls 1-10: "
                         f"{info['held_first10'] / 2**20:.1f} MiB, after calls 91-100: {info['held_last10'] / 2**20:.1f} MiB; "
                         f"per-call peak {info['peak_first10'] / 2**20:.1f} -> {info['peak_last10'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def plot(rs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({(r["device"], r["model"]) for r in rs})
    labels = sorted({f"{r['impl']} {r['method']}" for r in rs})
    cmap = plt.get_cmap("tab20")
    colour = {label: cmap(i % 20) for i, label in enumerate(labels)}    # one colour per series, all panels
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models) + 3, 4.5), squeeze=False)
    for ax, (device, model) in zip(axes[0], models):
        series = defaultdict(list)
        for r in rs:
            if (r["device"], r["model"]) == (device, model):
                series[f"{r['impl']} {r['method']}"].append((r["batch"], r["batch"] / r["median"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colour[label],
                    linestyle="--" if label.startswith(("zennit", "captum", "baseline")) else "-")
        ax.set(title=f"{model} ({device})", xlabel="batch size", ylabel="images/s", xscale="log", yscale="log")
    handles = [plt.Line2D([], [], color=colour[lb], marker="o",
                          linestyle="--" if lb.startswith(("zennit", "captum", "baseline")) else "-") for lb in labels]
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=pathlib.Path, nargs="+")
    ap.add_argument("--out", type=pathlib.Path, help="output stem (default: next to the first JSON)")
    ap.add_argument("--commit", help="the commit measured (default: the JSON's own git record)")
    args = ap.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.json]
    data = dict(runs[0], benchmarks=[b for r in runs for b in r["benchmarks"]])
    stem = args.out or args.json[0].with_suffix("")
    rs = rows(data)
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    commit = args.commit or c.get("id", "?")[:10]
    head = (f"# Benchmark {', '.join(p.name for p in args.json)}\n\n"
            f"machine: {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, "
            f"{m.get('node', '')}; commit {commit} ({c.get('time', '?')}); run {data.get('datetime', '?')}\n")
    stem.with_suffix(".md").write_text(head + table(rs) + "\n" + memory_lines(data) + "\n")
    if not rs:
        print(f"wrote {stem.with_suffix('.md')}; no throughput case in the JSON, so no plot")
        return
    plot(rs, stem.with_suffix(".png"))
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.png')}")


if __name__ == "__main__":
    main()
