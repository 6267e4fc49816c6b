#!/usr/bin/env python3
"""Figures of crash-hpc's analysis outputs, usable by hand and run by the jobs' --plot:

    python3 analysis/plots.py IN [--clusters clusters.json] --out OUT.png

The kind of IN is read from the file itself:
  /cka (similarity)                 heat map of CKA over layers; with --clusters, their blocks
  clusters JSON (cluster)           segments over depth, one colour per cluster, representatives marked
  /kl and /js (lens)                two heat maps side by side
  /alpha and /loss (landscape)      loss along the line between two models
  /a, /b and /loss (landscape)      contour plot of the loss plane, theta0/theta1/theta2 marked
  importance file (importance)      every score over depth; the angular distance of blocks as a heat map
  pruning study JSON (pipeline)     each task's score against the parameters kept, per method, before and after healing
Needs only numpy, h5py and matplotlib (Debian's python3-* packages)."""
import argparse
import json
import os
import sys

import numpy as np

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import colors, ticker  # noqa: E402

DPI = 150
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.titlesize": 12})


def fail(message):
    print(f"plots.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def model_name(attrs, key="model"):
    value = text(attrs.get(key, "")).rstrip("/")
    return os.path.basename(value) if value else ""


def layer_ticks(ax, n, axis):
    step = max(1, int(np.ceil(n / 12)))
    ticks = np.arange(0, n, step)
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks)


def read_clusters(path):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read clusters JSON ({e})")
    if not str(data.get("format", "")).startswith("crash-hpc clusters"):
        fail(f"{path}: not a clusters file of crash-hpc cluster (no \"format\": \"crash-hpc clusters 1\")")
    return data


def runs(members):
    """Contiguous runs [first, last] of a sorted list of layers."""
    out = []
    for m in members:
        if out and m == out[-1][1] + 1:
            out[-1][1] = m
        else:
            out.append([m, m])
    return out


def cluster_colours(k):
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def plot_cka(f, clusters_path):
    cka = f["cka"][()]
    attrs = dict(f.attrs)
    method = text(attrs.get("method", ""))
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    vmin = min(0.0, float(np.nanmin(cka)))
    im = ax.imshow(cka, origin="lower", cmap="magma", vmin=vmin, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="linear CKA")
    two = "model_b" in attrs or cka.shape[0] != cka.shape[1]
    name_a, name_b = model_name(attrs), model_name(attrs, "model_b")
    ax.set_ylabel(f"layer of {name_a}" if two and name_a else "layer (hidden-state index, 0 = embeddings)")
    ax.set_xlabel(f"layer of {name_b}" if two and name_b else "layer (hidden-state index, 0 = embeddings)")
    layer_ticks(ax, cka.shape[1], "x")
    layer_ticks(ax, cka.shape[0], "y")
    rows = int(attrs.get("num_examples", 0))
    what = f"{rows} examples" if text(attrs.get("pooling", "")) != "none" else f"{int(attrs.get('rows', 0))} tokens"
    title = "Linear CKA" + (f" of {name_a}" if name_a and not two else "")
    if two and name_a and name_b:
        title = f"Linear CKA, {name_a} vs {name_b}"
    ax.set_title(f"{title}\n({method}, {what})" if method else title)
    if clusters_path:
        data = read_clusters(clusters_path)
        colours = cluster_colours(len(data["clusters"]))
        for c, members in enumerate(data["clusters"]):
            for first, last in runs(sorted(members)):
                # Decoder layer i is hidden-state index i + 1.
                lo, size = first + 1 - 0.5, last - first + 1
                ax.add_patch(plt.Rectangle((lo, lo), size, size, fill=False, edgecolor=colours[c], linewidth=2))
        reps = [r + 1 for r in data.get("representatives", [])]
        ax.plot(reps, reps, linestyle="none", marker="*", markersize=9, color="white", markeredgecolor="black",
                label="representatives")
        ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
        ax.set_title(ax.get_title() + f", {len(data['clusters'])} clusters ({data.get('method', '')})")
    fig.tight_layout()
    return fig


def plot_segments(data):
    clusters, layers = data["clusters"], data.get("layers") or sorted(l for c in data["clusters"] for l in c)
    reps = set(data.get("representatives", []))
    colours = cluster_colours(len(clusters))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2), 2.6))
    for c, members in enumerate(clusters):
        for first, last in runs(sorted(members)):
            ax.broken_barh([(first - 0.5, last - first + 1)], (0, 1), facecolors=colours[c], edgecolor="black",
                           linewidth=0.8)
        mid = members[len(members) // 2]
        ax.text(mid, 1.12, f"C{c}", ha="center", va="bottom", fontsize=8)
    for r in sorted(reps):
        ax.plot(r, 0.5, marker="*", markersize=12, color="white", markeredgecolor="black", linestyle="none")
    ax.plot([], [], marker="*", markersize=10, color="white", markeredgecolor="black", linestyle="none",
            label="representative (kept layer)")
    ax.set_xlim(min(layers) - 0.6, max(layers) + 0.6)
    ax.set_ylim(-0.1, 1.75)
    ax.set_yticks([])
    ax.set_xlabel("decoder layer")
    step = max(1, int(np.ceil(len(layers) / 16)))
    ax.set_xticks(layers[::step])
    score = data.get("score")
    ax.set_title(f"{len(clusters)} clusters of layers {min(layers)}-{max(layers)} ({data.get('method', '')}"
                 + (f", score {score:.3f})" if isinstance(score, (int, float)) else ")"))
    ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def plot_lens(f):
    kl, js = f["kl"][()], f["js"][()]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 5.0))
    for ax, m, title, cmap in ((axes[0], kl, "mean KL($p_i \\parallel p_j$)", "viridis"),
                               (axes[1], js, "mean Jensen-Shannon divergence", "viridis")):
        im = ax.imshow(m, origin="lower", cmap=cmap, interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="nats")
        ax.set_title(title)
        ax.set_xlabel("layer j (hidden-state index)")
        ax.set_ylabel("layer i (hidden-state index)")
        layer_ticks(ax, m.shape[1], "x")
        layer_ticks(ax, m.shape[0], "y")
    name = model_name(dict(f.attrs))
    fig.suptitle("Logit lens: distances between layers' next-token distributions" + (f" ({name})" if name else ""))
    fig.tight_layout()
    return fig


def plot_line(f):
    alpha, loss = f["alpha"][()], f["loss"][()]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(alpha, loss, marker="o", markersize=3.5, linewidth=1.6, color="tab:blue")
    for a0, label in ((0.0, r"$\theta_A$"), (1.0, r"$\theta_B$")):
        i = int(np.argmin(np.abs(alpha - a0)))
        if abs(alpha[i] - a0) < 1e-9:
            ax.plot(alpha[i], loss[i], marker="D", color="tab:red", linestyle="none")
            ax.annotate(label, (alpha[i], loss[i]), textcoords="offset points", xytext=(6, 8))
    ax.set_xlabel(r"$\alpha$  in  $\theta(\alpha) = (1-\alpha)\,\theta_A + \alpha\,\theta_B$")
    ax.set_ylabel("loss (mean next-token cross-entropy)")
    ax.set_title("Loss along the line between two models")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_plane(f):
    a, b, loss = f["a"][()], f["b"][()], f["loss"][()]
    if loss.shape != (len(a), len(b)):
        fail(f"/loss has shape {loss.shape}, expected [len(a), len(b)] = {(len(a), len(b))}")
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    z = loss.T  # rows: b, columns: a
    lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
    if lo > 0 and hi / lo > 20:
        levels, norm = np.geomspace(lo, hi, 30), colors.LogNorm(lo, hi)
    else:
        levels, norm = np.linspace(lo, hi if hi > lo else lo + 1e-9, 30), None
    cs = ax.contourf(a, b, z, levels=levels, norm=norm, cmap="viridis")
    ax.contour(a, b, z, levels=levels[::3], norm=norm, colors="white", linewidths=0.4, alpha=0.6)
    bar = fig.colorbar(cs, ax=ax, fraction=0.046, pad=0.04, label="loss")
    if norm is None:  # ticks at round numbers, not at the 30 contour levels
        bar.locator = ticker.MaxNLocator(8)
        bar.update_ticks()
    for (x, y), label in (((0, 0), r"$\theta_0$"), ((1, 0), r"$\theta_1$"), ((0, 1), r"$\theta_2$")):
        ax.plot(x, y, marker="o", markersize=7, color="tab:red", markeredgecolor="white", linestyle="none")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), color="white", fontsize=11)
    ax.set_xlabel(r"$a$  ($\theta_1 - \theta_0$ direction)")
    ax.set_ylabel(r"$b$  ($\theta_2 - \theta_0$ direction)")
    ax.set_title(r"Loss on the plane $\theta_0 + a(\theta_1-\theta_0) + b(\theta_2-\theta_0)$")
    fig.tight_layout()
    return fig


IMPORTANCE_LABELS = {
    "block_influence": "Block Influence (ShortGPT): 1 - mean cos($h_l$, $h_{l+1}$)",
    "cka_importance": "1 - CKA($h_l$, $h_{l+1}$) (CRaSh)",
}


def plot_importance(f):
    """Scores of decoder layers over depth (left) and d(l, n) of n-layer blocks (right)."""
    methods = [m for m in json.loads(text(f.attrs.get("methods", "[]"))) if m in f]
    angular = f["angular_distance"][()] if "angular_distance" in f else None
    fig, axes = plt.subplots(1, 2 if angular is not None else 1, figsize=(12.0 if angular is not None else 6.6, 4.8),
                             squeeze=False)
    ax = axes[0][0]
    for m in methods:
        if m == "angular_distance":
            y, label = angular[:, 0], "angular distance of one layer, d(l, 1) (Gromov et al.)"
        else:
            y, label = f[m][()], IMPORTANCE_LABELS.get(m, m)
        ax.plot(np.arange(len(y)), y, marker="o", markersize=3.5, linewidth=1.5, label=label)
    ax.set_xlabel("decoder layer l")
    ax.set_ylabel("score (higher: more important)")
    ax.set_title("Layer importance over depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len(methods):
        layer_ticks(ax, int(f.attrs.get("num_layers", 1)), "x")
    if angular is not None:
        ax = axes[0][1]
        im = ax.imshow(np.ma.masked_invalid(angular.T), origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(-0.5, angular.shape[0] - 0.5, 0.5, angular.shape[1] + 0.5), aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="d(l, n)")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("first layer l of the block")
        ax.set_ylabel("block size n")
        ax.set_title("Angular distance of blocks [l, l+n) (lower: removed first)")
    name = model_name(dict(f.attrs))
    fig.suptitle("Layer importance" + (f" ({name})" if name else ""))
    fig.tight_layout()
    return fig


STUDY_COLOURS = {"uniform": "#1f77b4", "remove": "#2ca02c", "share": "#17becf", "shortgpt": "#d62728",
                 "angular": "#ff7f0e", "sleb": "#9467bd", "laco": "#8c564b"}


def plot_study(study):
    """One panel per task: its score against the fraction of parameters kept, one colour per method;
    hollow markers and dashed lines before healing, filled and solid after; the full model a star."""
    tasks = study["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = study["metrics"][task]
        for method in study["methods"]:
            rows = sorted((r for r in study["rows"] if r["method"] == method), key=lambda r: r["kept_fraction"])
            if not rows:
                continue
            colour = STUDY_COLOURS.get(method)
            x = [r["kept_fraction"] for r in rows]
            ax.plot(x, [r["pruned"][task] for r in rows], linestyle="--", marker="o", markerfacecolor="none",
                    color=colour, linewidth=1.0)
            ax.plot(x, [r["healed"][task] for r in rows], linestyle="-", marker="o", color=colour, linewidth=1.6,
                    label=method)
        ax.plot([1.0], [study["full"]["scores"][task]], marker="*", markersize=13, color="black", linestyle="none",
                label="full model")
        ax.set_xlabel("parameters kept (fraction of the full model)")
        ax.set_ylabel(metric)
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{task} ({metric})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="healed (solid) / pruned (dashed)", title_fontsize=8)
    fig.suptitle(f"Layer pruning at equal budget: healing = {study['healing']}, {study['steps']} steps")
    fig.tight_layout()
    return fig


def figure_of(path, clusters=None):
    """The figure of one crash-hpc output (the kind read from the file), as a matplotlib figure."""
    with open(path, "rb") as f:
        is_hdf5 = f.read(8) == b"\x89HDF\r\n\x1a\n"
    if not is_hdf5:
        with open(path) as f:
            try:
                doc = json.load(f)
            except ValueError:
                doc = None
        if isinstance(doc, dict) and str(doc.get("format", "")).startswith("crash-hpc pruning study"):
            return plot_study(doc)
        return plot_segments(read_clusters(path))
    import h5py

    with h5py.File(path, "r") as f:
        if text(f.attrs.get("format", "")).startswith("crash-hpc importance"):
            return plot_importance(f)
        if "cka" in f:
            return plot_cka(f, clusters)
        if "kl" in f and "js" in f:
            return plot_lens(f)
        if "alpha" in f and "loss" in f:
            return plot_line(f)
        if "a" in f and "b" in f and "loss" in f:
            return plot_plane(f)
        fail(f"{path}: not a file this script plots (expected /cka, /kl and /js, /alpha and /loss, "
             f"or /a, /b and /loss, or an importance file; found {sorted(f.keys())})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a crash-hpc output: CKA, lens, landscape or importance HDF5, a clusters JSON or "
                   "pruning_study.json")
    p.add_argument("--clusters", help="clusters JSON: draw its blocks on a CKA heat map")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args()
    if not os.path.exists(args.input):
        fail(f"{args.input}: no such file")
    if args.clusters and not os.path.exists(args.clusters):
        fail(f"{args.clusters}: no such file")

    fig = figure_of(args.input, args.clusters)
    # Written under a temporary name, then renamed: no half-written figure.
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=DPI)
    plt.close(fig)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
