#!/usr/bin/env python3
"""The report of a crash-hpc pipeline run: one self-contained HTML page (figures embedded as PNG
data, no scripts, nothing fetched), written by `crash-hpc report --work DIR` and `pipeline --report`:

    python3 analysis/report.py --work DIR [--out DIR/report.html] [--title TITLE]

It shows what the work folder holds, so a run that stopped early gets a report of its finished
stages: the CRaSh table with lm-eval's standard errors, every figure of the run (CKA with the
clusters, the cluster segments, the logit lens, the loss landscapes, the training curves), each
task's evaluation table with a link to its per-example details, the models, the time and peak
memory of each stage, and the settings and versions of the run.
Needs only numpy, h5py and matplotlib (Debian's python3-* packages)."""
import argparse
import base64
import datetime
import glob
import html
import io
import json
import math
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402  (also selects matplotlib's Agg backend)
from plots import plt  # noqa: E402

MODES = ("uniform", "remove", "share")
COLUMNS = (("full-zero-shot", "Full zero-shot"), ("emulator-zero-shot", "Emulator zero-shot"),
           ("emulator-fine-tuned", "Emulator fine-tuned"), ("plugin", "Plug-in"))
LOWER_IS_BETTER = {"perplexity", "nll", "bits_per_token", "bits_per_byte", "word_perplexity", "byte_perplexity"}
MODE_COLOURS = {"uniform": "tab:blue", "remove": "tab:orange", "share": "tab:green"}


def fail(message):
    print(f"report.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def esc(value):
    return html.escape(str(value), quote=True)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot read JSON ({e})")


def read_jsonl(path):
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        fail(f"{path}:{n}: not JSON ({e})")
    except OSError as e:
        fail(f"{path}: cannot read ({e})")
    return rows


def size_text(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def duration_text(seconds):
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def count_text(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def safetensors_params(folder):
    """Parameters of an HF folder, from the safetensors headers alone (no weights are read)."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    total = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry.get("shape", []))
    return total if files else None


def figure_data(fig, alt, caption=""):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def value_text(metric):
    """'0.4547 ± 0.0110' from an eval metric {"value": v, "stderr": s}."""
    v, s = metric.get("value"), metric.get("stderr")
    if not isinstance(v, (int, float)):
        return "–"
    text = f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    if isinstance(s, (int, float)) and math.isfinite(s):
        text += f" ± {s:.4f}"
    return text


class Work:
    """What a pipeline's work folder holds."""

    def __init__(self, root):
        self.root = root
        self.run = read_json(self.path("run.json")) if self.exists("run.json") else {}
        self.stages = read_jsonl(self.path("logs", "stages.jsonl")) if self.exists("logs", "stages.jsonl") else []
        self.evals = {}
        for path in sorted(glob.glob(self.path("eval", "*.json"))):
            self.evals[os.path.basename(path)[:-len(".json")]] = read_json(path)
        self.table = read_json(self.path("crash_table.json")) if self.exists("crash_table.json") else None
        if not (self.run or self.stages or self.evals or self.table):
            fail(f"{root}: not a pipeline work folder (none of run.json, logs/stages.jsonl, eval/*.json, "
                 f"crash_table.json is there)")
        self.options = self.run.get("options", {})
        self.modes = [m for m in MODES if os.path.isdir(self.path(m))]

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def exists(self, *parts):
        return os.path.exists(self.path(*parts))

    def metric(self, setting, task):
        """(metric name, {"value", "stderr"}) of a task's headline metric in one eval output."""
        for r in self.evals.get(setting, {}).get("results", []):
            if r.get("task") != task:
                continue
            for name in ("acc", "exact_match", "perplexity"):
                m = r.get("metrics", {}).get(name)
                if m and isinstance(m.get("value"), (int, float)):
                    return name, m
        return None, None

    def latest_stages(self):
        """The newest record of each stage that ran, in pipeline order: a resumed pipeline skips what an
        earlier run finished, and its time and memory are that run's."""
        latest, order = {}, []
        for s in self.stages:
            name = s.get("stage", "?")
            if name not in order:
                order.append(name)
            if s.get("status") == "ran" or name not in latest:
                latest[name] = s
        return [latest[n] for n in order]

    def task_order(self, names):
        """`names` in the order of the pipeline's --eval-task options (JSON objects come sorted)."""
        given = [os.path.splitext(os.path.basename(t))[0] for t in self.options.get("eval-task", [])]
        return sorted(names, key=lambda t: (given.index(t) if t in given else len(given), t))

    def model_dir(self):
        model = self.options.get("model")
        # Relative paths of the options are relative to where the pipeline ran.
        if model and not os.path.isabs(model) and self.run.get("cwd"):
            model = os.path.join(self.run["cwd"], model)
        return model if model and os.path.isdir(model) else None


def link(href_from, target, text):
    return f'<a href="{esc(os.path.relpath(target, href_from))}">{esc(text)}</a>'


def section_header(work, title):
    run = work.run
    model = work.options.get("model", "")
    ran = [s for s in work.latest_stages() if s.get("status") == "ran"]
    total = sum(s.get("seconds", 0) for s in ran)
    grid = ""
    if "tp" in work.options and "pp" in work.options:
        tp, pp = int(work.options["tp"]), int(work.options["pp"])
        ranks = run.get("ranks")
        grid = f"tp {tp} × pp {pp}" + (f" × dp {ranks // (tp * pp)}" if ranks else "")
    facts = [("model", model), ("work folder", os.path.abspath(work.root)),
             ("crash-hpc", run.get("tool_version", "")), ("LibTorch", run.get("torch_version", "")),
             ("ranks", run.get("ranks", "")), ("grid", grid), ("dtype", work.options.get("dtype", "")),
             ("threads per rank", run.get("torch_threads", "")), ("host", run.get("host", "")),
             ("started", run.get("started", "")),
             ("stage time", f"{duration_text(total)} over {len(ran)} stages run" if ran else "")]
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts if v not in ("", None))
    return f"<header><h1>{esc(title)}</h1><table class='facts'>{rows}</table></header>"


def section_crash_table(work):
    if not work.table:
        return "<section><h2>CRaSh results</h2><p class='missing'>No CRaSh table yet (crash_table.json): the " \
               "pipeline has not finished every evaluation.</p></section>"
    out = ["<section id='crash'><h2>CRaSh results</h2>",
           "<p>Each cell is the task's headline metric ± lm-eval's standard error. The plug-in is the full model with "
           "the emulator's fine-tuned adapter layers plugged back in; it is compared with the full model zero-shot. "
           "The best plug-in of each task is marked.</p>"]
    for task in work.task_order(work.table):
        entry = work.table[task]
        metric = entry.get("metric", "")
        lower = metric in LOWER_IS_BETTER
        modes = sorted((m for m in entry if m != "metric"), key=lambda m: (MODES + (m,)).index(m))
        plugins = {m: entry[m].get("plugin") for m in modes if isinstance(entry[m].get("plugin"), (int, float))}
        best = (min if lower else max)(plugins, key=plugins.get) if plugins else None
        out.append(f"<h3>{esc(task)} <span class='metric'>{esc(metric)}, "
                   f"{'lower' if lower else 'higher'} is better</span></h3>")
        out.append("<table class='results'><tr><th>Emulator</th>"
                   + "".join(f"<th>{esc(label)}</th>" for _, label in COLUMNS) + "<th>Plug-in − full</th></tr>")
        for mode in modes:
            cells = []
            for key, _ in COLUMNS:
                setting = "full" if key == "full-zero-shot" else f"{mode}-{key}"
                _, m = work.metric(setting, task)
                value = entry[mode].get(key)
                text = value_text(m) if m else (f"{value:.4f}" if isinstance(value, (int, float)) else "–")
                cls = " class='best'" if key == "plugin" and mode == best else ""
                cells.append(f"<td{cls}>{esc(text)}</td>")
            full, plug = entry[mode].get("full-zero-shot"), entry[mode].get("plugin")
            delta = f"{plug - full:+.4f}" if isinstance(full, (int, float)) and isinstance(plug, (int, float)) else "–"
            out.append(f"<tr><th>{esc(mode)}</th>{''.join(cells)}<td>{esc(delta)}</td></tr>")
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def training_figure(work):
    logs = {m: read_jsonl(work.path(m, "train", "train_log.jsonl")) for m in work.modes
            if work.exists(m, "train", "train_log.jsonl")}
    if not logs:
        return None
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11.5, 4.2), gridspec_kw={"width_ratios": [2.2, 1]})
    for mode, rows in logs.items():
        colour = MODE_COLOURS.get(mode)
        steps = [r for r in rows if "loss" in r]
        # A resumed run logs its steps again from the checkpoint on: the last record of each step counts.
        by_step = {r["step"]: r for r in steps}
        xs = sorted(by_step)
        loss = [by_step[s]["loss"] for s in xs]
        ax_loss.plot(xs, loss, color=colour, alpha=0.25, linewidth=0.8)
        window = max(1, len(xs) // 25)
        if len(xs) > window:
            smooth = [sum(loss[i - window + 1:i + 1]) / window for i in range(window - 1, len(loss))]
            ax_loss.plot(xs[window - 1:], smooth, color=colour, linewidth=1.8, label=f"{mode}: training")
        else:
            ax_loss.plot(xs, loss, color=colour, linewidth=1.8, label=f"{mode}: training")
        val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
        if val:
            vx = sorted(val)
            ax_loss.plot(vx, [val[s] for s in vx], color=colour, marker="o", linestyle="--", linewidth=1.2,
                         markersize=5, label=f"{mode}: validation")
        ax_lr.plot(xs, [by_step[s].get("lr", float("nan")) for s in xs], color=colour, label=mode)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (next-token cross-entropy)")
    ax_loss.set_title("Fine-tuning of the emulators (thin: every step; thick: moving mean)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8, ncol=2)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Schedule")
    ax_lr.grid(alpha=0.3)
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    return fig


def landscape_figure(work):
    import h5py

    lines = {}
    for mode in work.modes:
        path = work.path(mode, "landscape.h5")
        if os.path.exists(path):
            with h5py.File(path, "r") as f:
                if "alpha" in f and "loss" in f:
                    lines[mode] = (f["alpha"][()], f["loss"][()])
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.3))
    for mode, (alpha, loss) in lines.items():
        ax.plot(alpha, loss, marker="o", markersize=3.5, linewidth=1.6, color=MODE_COLOURS.get(mode),
                label=f"full → {mode} plug-in")
    for a0 in (0.0, 1.0):
        ax.axvline(a0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel(r"$\alpha$  in  $(1-\alpha)\,\theta_{full} + \alpha\,\theta_{plug-in}$")
    ax.set_ylabel("loss (next-token cross-entropy)")
    ax.set_title("Loss along the line from the full model to each plug-in")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def section_figures(work):
    figures = []

    def add(make, alt, caption):
        try:
            fig = make()
        except SystemExit:
            raise
        except Exception as e:  # a damaged file costs its figure, not the report
            figures.append(f"<p class='missing'>{esc(alt)}: could not be drawn ({esc(type(e).__name__)}: {esc(e)})</p>")
            return
        if fig is not None:
            figures.append(figure_data(fig, alt, caption))

    cka, clusters = work.path("cka.h5"), work.path("clusters.json")
    if os.path.exists(cka):
        add(lambda: plots.figure_of(cka, clusters if os.path.exists(clusters) else None),
            "CKA between layers with the clusters",
            "Linear CKA between every pair of layers' representations; squares: the clusters of the middle layers, "
            "stars: the layer each cluster keeps.")
    if os.path.exists(clusters):
        add(lambda: plots.figure_of(clusters), "Cluster segments",
            "The middle layers' clusters over depth; the emulators keep one layer per cluster (uniform and share) "
            "or drop the clusters' other layers (remove).")
    if work.exists("lens.h5"):
        add(lambda: plots.figure_of(work.path("lens.h5")), "Logit lens",
            "Distances between the next-token distributions that each layer's hidden state gives through the "
            "final norm and the head.")
    add(lambda: landscape_figure(work), "Loss landscapes",
        "Mean next-token loss over every token of the validation examples (the fine-tuning data without them), "
        "context included, along the straight line between the full model's weights and each plug-in's.")
    add(lambda: training_figure(work), "Training curves",
        "Training loss of each emulator's adapters, validation loss where the run had validation data, and the "
        "learning rate.")
    if not figures:
        figures.append("<p class='missing'>No figure yet: no similarity, clusters, lens, landscape or training "
                       "output in the work folder.</p>")
    return "<section id='figures'><h2>Figures</h2>" + "".join(figures) + "</section>"


def setting_order(name):
    if name == "full":
        return (0, 0, name)
    for i, mode in enumerate(MODES):
        if name.startswith(mode + "-"):
            for j, (key, _) in enumerate(COLUMNS):
                if name == f"{mode}-{key}":
                    return (1 + i, j, name)
    return (9, 0, name)


def section_eval(work, out_dir):
    if not work.evals:
        return ""
    tasks = {}
    for setting, data in work.evals.items():
        for r in data.get("results", []):
            tasks.setdefault(r.get("task", "?"), []).append((setting, r))
    out = ["<section id='eval'><h2>Evaluation, per task</h2>",
           "<p>Every metric of every evaluation (value ± standard error), with the per-example details of each.</p>"]
    for task in work.task_order(tasks):
        rows = tasks[task]
        names = []
        for _, r in rows:
            for n in r.get("metrics", {}):
                if n not in names:
                    names.append(n)
        kind = rows[0][1].get("kind", "")
        out.append(f"<h3>{esc(task)} <span class='metric'>{esc(kind)}</span></h3><table class='results'>"
                   "<tr><th>Model</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
                   + "<th>examples</th><th>details</th></tr>")
        for setting, r in sorted(rows, key=lambda x: setting_order(x[0])):
            details = work.path("eval", setting + ".details.jsonl")
            ref = link(out_dir, details, "details.jsonl") if os.path.exists(details) else "–"
            cells = "".join(f"<td>{esc(value_text(r['metrics'][n]) if n in r.get('metrics', {}) else '–')}</td>"
                            for n in names)
            out.append(f"<tr><th>{esc(setting)}</th>{cells}<td>{esc(r.get('num_examples', ''))}</td><td>{ref}</td></tr>")
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def config_rows(config):
    keys = (("model_type", "model_type"), ("layers", "num_hidden_layers"), ("hidden size", "hidden_size"),
            ("MLP width", ("intermediate_size", "ffn_dim")), ("attention heads", "num_attention_heads"),
            ("key/value heads", "num_key_value_heads"), ("head size", "head_dim"), ("vocabulary", "vocab_size"),
            ("positions", "max_position_embeddings"), ("tied embeddings", "tie_word_embeddings"),
            ("stored dtype", ("dtype", "torch_dtype")), ("sliding window", "sliding_window"))
    rows = []
    for label, names in keys:
        for name in (names,) if isinstance(names, str) else names:
            if name in config and config[name] is not None:
                rows.append((label, config[name]))
                break
    return rows


def section_models(work):
    entries = []
    model = work.model_dir()
    if model:
        entries.append(("full model", model, None))
    for mode in work.modes:
        for kind in ("emulator", "plugin"):
            d = work.path(mode, kind)
            if os.path.exists(os.path.join(d, "config.json")):
                entries.append((f"{mode} {kind}", d, mode if kind == "emulator" else None))
    if not entries:
        return ""
    configs = [(label, dict(config_rows(read_json(os.path.join(d, "config.json")))), safetensors_params(d), d, mode)
               for label, d, mode in entries if os.path.exists(os.path.join(d, "config.json"))]
    labels = []
    for _, rows, _, _, _ in configs:
        labels += [label for label in rows if label not in labels]
    out = ["<section id='models'><h2>Models</h2><table class='results'><tr><th></th>"
           + "".join(f"<th>{esc(c[0])}</th>" for c in configs) + "</tr>"]
    out.append("<tr><th>parameters</th>" + "".join(
        f"<td>{esc(count_text(p) if p else '–')}</td>" for _, _, p, _, _ in configs) + "</tr>")
    for label in labels:
        cells = "".join(f"<td>{esc(rows.get(label, '–'))}</td>" for _, rows, _, _, _ in configs)
        out.append(f"<tr><th>{esc(label)}</th>{cells}</tr>")
    out.append("</table>")
    plans = []
    for label, _, _, d, mode in configs:
        plan_path = os.path.join(d, "crash_plan.json")
        if mode and os.path.exists(plan_path):
            plan = read_json(plan_path)
            slots = plan.get("slots", [])
            kept = ", ".join(f"{s.get('source')}{'*' if s.get('train') else ''}" for s in slots)
            plans.append(f"<tr><th>{esc(mode)}</th><td>{esc(plan.get('full_layers', ''))} → {len(slots)}</td>"
                         f"<td>{esc(kept)}</td></tr>")
    if plans:
        out.append("<h3>Emulator plans</h3><p>Layers of the full model each emulator runs, in order "
                   "(* marks the trainable adapters; a layer named twice is shared).</p><table class='results'>"
                   "<tr><th>Emulator</th><th>layers</th><th>slots (full-model layer)</th></tr>"
                   + "".join(plans) + "</table>")
    out.append("</section>")
    return "".join(out)


def section_stages(work, out_dir):
    if not work.stages:
        return "<section id='stages'><h2>Stages</h2><p class='missing'>No stage records (logs/stages.jsonl).</p></section>"
    latest = work.latest_stages()
    out = ["<section id='stages'><h2>Stages</h2><p>Wall time and the peak resident memory of the busiest rank of "
           "each stage, with its full log.</p><table class='results'><tr><th>Stage</th><th>job</th><th>time</th>"
           "<th>peak memory</th><th>ranks</th><th>log</th><th>arguments</th></tr>"]
    total = 0.0
    for s in latest:
        name = s.get("stage", "?")
        ran = s.get("status") == "ran"
        total += s.get("seconds", 0) if ran else 0
        time = duration_text(s["seconds"]) if ran and "seconds" in s else esc(s.get("status", ""))
        peak = size_text(s["peak_rss_bytes"]) if ran and "peak_rss_bytes" in s else "–"
        log = s.get("log")
        log_cell = link(out_dir, work.path(log), os.path.basename(log)) if log and work.exists(log) else "–"
        args = " ".join(s.get("args", []))
        out.append(f"<tr><th>{esc(name)}</th><td>{esc(s.get('job', ''))}</td><td>{time}</td><td>{esc(peak)}</td>"
                   f"<td>{esc(s.get('ranks', ''))}</td><td>{log_cell}</td>"
                   f"<td><details><summary>show</summary><code>{esc(args)}</code></details></td></tr>")
    out.append(f"<tr class='total'><th>all stages</th><td></td><td>{duration_text(total)}</td><td></td><td></td>"
               "<td></td><td></td></tr></table></section>")
    return "".join(out)


def section_settings(work):
    if not work.options:
        return ""
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(', '.join(map(str, v)) if isinstance(v, list) else v)}</td></tr>"
                   for k, v in sorted(work.options.items()) if k not in ("help",))
    return ("<section id='settings'><h2>Settings of the pipeline</h2><table class='facts'>" + rows
            + "</table></section>")


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2330;
background:#f6f7f9;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:1.7em;margin:0 0 12px}h2{border-bottom:2px solid #dfe3ea;padding-bottom:4px;margin-top:36px}
h3{margin:22px 0 6px}.metric{font-weight:normal;color:#5b6475;font-size:.85em}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.92em}
td,th{border:1px solid #dfe3ea;padding:4px 9px;text-align:left;vertical-align:top}
table.results td{font-variant-numeric:tabular-nums;white-space:nowrap}
table.results tr:nth-child(even){background:#f8f9fb}
table.facts th{background:#f1f3f6;font-weight:600;white-space:nowrap}
td.best{background:#e2f4e4;font-weight:600}tr.total{font-weight:600;background:#f1f3f6}
figure{margin:18px 18px 18px 0;display:inline-block;vertical-align:top;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid #eef0f3}
figcaption{color:#5b6475;font-size:.9em;max-width:640px}.missing{color:#9a5b00}
nav a{margin-right:14px}code{font-size:.85em;white-space:pre-wrap;word-break:break-all}
footer{margin-top:36px;color:#8a92a3;font-size:.85em}
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the pipeline's work folder")
    p.add_argument("--out", help="the page to write (default: WORK/report.html)")
    p.add_argument("--title", help="the page's title (default: the model's name)")
    p.add_argument("--tool-version", default="", help="crash-hpc's version (crash-hpc report passes it)")
    p.add_argument("--torch-version", default="", help="LibTorch's version (crash-hpc report passes it)")
    args = p.parse_args()
    if not os.path.isdir(args.work):
        fail(f"--work: {args.work} is not a folder")
    out = args.out or os.path.join(args.work, "report.html")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        fail(f"--out: the folder {out_dir} does not exist")
    work = Work(args.work)
    work.run.setdefault("tool_version", args.tool_version)
    work.run.setdefault("torch_version", args.torch_version)
    model = work.options.get("model", "")
    title = args.title or f"CRaSh study of {model.rstrip('/') or 'a model'}"
    nav = "".join(f"<a href='#{i}'>{t}</a>" for i, t in (("crash", "Results"), ("figures", "Figures"),
                                                        ("eval", "Evaluation"), ("models", "Models"),
                                                        ("stages", "Stages"), ("settings", "Settings")))
    made = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = [section_header(work, title), f"<nav>{nav}</nav>", section_crash_table(work), section_figures(work),
            section_eval(work, out_dir), section_models(work), section_stages(work, out_dir), section_settings(work),
            f"<footer>Written by crash-hpc report ({esc(args.tool_version or work.run.get('tool_version', ''))}) on "
            f"{esc(made)} from {esc(os.path.abspath(args.work))}.</footer>"]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body><main>"
            + "\n".join(body) + "</main></body></html>\n")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(page.encode()) / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
