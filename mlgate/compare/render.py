"""The report's output formats: terminal table, markdown, CSV, JSON and a self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from typing import Any, Callable

from mlflow.tracking import MlflowClient

from mlgate.compare.histories import read_histories
from mlgate.compare.report import Report

RUN_COLUMNS = [
    ("run", "run_name"), ("method", "method"), ("state", "state"), ("verdict", "verdict"),
    ("gap log10", "grad_gap_log10"), ("drift", "gate_drift"), ("input std", "gate_input_std"),
    ("eff. len", "effective_length"), ("active", "active_tokens"), ("base", "acc_base"),
    ("novel", "acc_novel"), ("HM", "acc_hm"), ("params", "trainable_params"),
]
GROUP_COLUMNS = [
    ("method", "method"), ("runs", "n_runs"), ("verdicts", "verdicts"), ("collapse rate", "collapse_rate"),
    ("HM mean", "acc_hm_mean"), ("HM 95% CI", "acc_hm_ci"), ("gain vs ungated (95% CI)", "gain_text"),
    ("HM best", "acc_hm_best"), ("depth heterogeneity", "depth_heterogeneity"),
]
IMPORTANCE_COLUMNS = [("setting", "setting"), ("decides collapse", "verdict"), ("decides HM", "acc_hm")]
REPRESENTATION_COLUMNS = [("method", "method"), ("runs", "n_runs"), ("alignment", "alignment"),
                          ("clustering (silhouette)", "silhouette"), ("separation", "separation"), ("HM", "acc_hm")]
STRATEGY_COLUMNS = [("method", "method"), ("runs", "n_runs"), ("fixed (all on)", "fixed"), ("random", "random"),
                    ("per layer", "per_layer"), ("per token (learned)", "per_token")]
HEADLINE_COLUMNS = [
    ("kind", "kind"), ("method", "method"), ("runs", "n_runs"),
    ("adapted / pruned", lambda row: f"{row['n_adapted']}/{row['n_runs']}, {100 * row['adapted']:.0f}%"),
    ("params", "trainable_params"), ("HM", "acc_hm"), ("gain vs baseline", "gain_vs_baseline"),
    ("compression", "compression"),
    ("baselines", lambda row: "; ".join(f"{name} {b['verdict']} (HM {fmt(b['acc_hm'])})"
                                        for name, b in row["baselines"].items()) or None),
]
CONTRACT_RUN_KEYS = [
    "run_id", "run_name", "study", "trial", "method", "state", "verdict", "grad_gap_log10", "gate_drift",
    "gate_batch_std", "gate_input_std", "effective_length", "active_tokens", "acc_base", "acc_novel", "acc_hm", "trainable_params",
    "baseline",
]


def fmt(value: Any) -> str:
    """Human formatting: '—' for missing, 4 significant digits, compact params and verdict counts."""
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{v} {k}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        return f"{value:.4g}"
    return str(value)


def _rows(items: list[Any], columns: list[tuple[str, Any]]) -> list[list[str]]:
    # A column is a key of the item, or a function of it (a cell made of several values).
    get: Callable[[Any, str], Any] = (lambda o, k: o[k]) if items and isinstance(items[0], dict) else getattr
    return [[fmt(key(item) if callable(key) else get(item, key)) for _, key in columns] for item in items]


def gain_text(gain: dict[str, Any] | None) -> str | None:
    """A gain over the ungated baseline as one cell: "+2.1 [-0.5, +4.7] vs coop, not distinguishable"."""
    if gain is None:
        return None
    if gain["ci"] is None:
        return f"{gain['mean']:+.3g} vs {gain['baseline']} (one run on a side: no interval)"
    low, high = gain["ci"]
    verdict = "distinguishable" if gain["distinguishable"] else "not distinguishable"
    return f"{gain['mean']:+.3g} [{low:+.3g}, {high:+.3g}] vs {gain['baseline']}, {verdict}"


def _importance_rows(importance: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    settings = sorted({k for scores in importance.values() for k in scores},
                      key=lambda k: -importance.get("verdict", {}).get(k, importance.get("acc_hm", {}).get(k, 0.0)))
    return [{"setting": k, "verdict": importance.get("verdict", {}).get(k), "acc_hm": importance.get("acc_hm", {}).get(k)}
            for k in settings]


def _sections(report: Report) -> list[tuple[str, list[tuple[str, Any]], list[list[str]]]]:
    data = report.to_json()
    groups = [{**g, "gain_text": gain_text(g.get("gain_vs_baseline"))} for g in data["groups"]]
    sections = [
        ("Gating vs pruning", HEADLINE_COLUMNS, _rows(data["headline"], HEADLINE_COLUMNS)),
        ("Methods", GROUP_COLUMNS, _rows(groups, GROUP_COLUMNS)),
    ]
    if data["importance"]:
        sections.append((f"What decides the verdict (study {data['importance_study']}; fANOVA importance)",
                         IMPORTANCE_COLUMNS, _rows(_importance_rows(data["importance"]), IMPORTANCE_COLUMNS)))
    if data["representation"]:
        sections.append(("Representation quality (Table III)", REPRESENTATION_COLUMNS,
                         _rows(data["representation"], REPRESENTATION_COLUMNS)))
    if data["gate_strategies"]:
        sections.append(("Gate strategies swapped at evaluation (Table II, acc/val)", STRATEGY_COLUMNS,
                         _rows(data["gate_strategies"], STRATEGY_COLUMNS)))
    sections.append((f"Runs (by {report.rank_by})", RUN_COLUMNS, _rows(report.ranked(), RUN_COLUMNS)))
    return sections


def render_table(report: Report) -> str:
    """A readable terminal table (rich)."""
    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=False, color_system=None)
    console.print(f"mlgate.compare — experiment [b]{report.experiment}[/b]: {len(report.runs)} runs")
    if report.ui:
        console.print(f"MLflow UI, training view: {report.ui}", highlight=False, soft_wrap=True)
    for title, columns, rows in _sections(report):
        table = Table(title=title, title_justify="left")
        for name, _ in columns:
            table.add_column(name, overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for note in report.to_json()["notes"]:
        console.print(note, highlight=False)
    return buffer.getvalue()


def render_markdown(report: Report) -> str:
    out = [f"# mlgate.compare — experiment `{report.experiment}`", ""]
    if report.ui:
        out += [f"In the [MLflow UI, training view]({report.ui}).", ""]
    for title, columns, rows in _sections(report):
        out += [f"## {title}", "", "| " + " | ".join(n for n, _ in columns) + " |",
                "|" + "---|" * len(columns)]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        out.append("")
    out += [f"- {note}" for note in report.to_json()["notes"]]
    return "\n".join(out)


def render_csv(report: Report) -> str:
    """One row per run, the JSON run object's keys as columns (empty where not logged)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CONTRACT_RUN_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for run in report.ranked():
        writer.writerow({k: "" if v is None else v for k, v in run.as_json().items()})
    return buffer.getvalue()


def render_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2)


# --------------------------------------------------------------------------------------------------
# HTML with embedded plots.


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(report: Report, client: MlflowClient | None, gap_threshold: float) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r.method for r in report.runs})
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    plots: list[tuple[str, str]] = []
    if client is not None:  # runs judged from their verdict/* metrics were read without histories
        _read_missing(report, client, ("grad/gap_log10", "gate/mean", "mask/active_tokens"))

    def curves(key: str, title: str, ylabel: str, hline: float | None = None) -> None:
        runs = [r for r in report.runs if r.history.get(key)]
        if not runs:
            return
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for m in methods:
            for i, r in enumerate(x for x in runs if x.method == m):
                steps, values = zip(*r.history[key])
                ax.plot(steps, values, color=colour[m], alpha=0.6, label=m if i == 0 else None)
        if hline is not None:
            ax.axhline(hline, color="black", linestyle="--", linewidth=1, label=f"{hline:g} orders")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=8)
        plots.append((title, _png(fig)))

    curves("grad/gap_log10", "Gradient gap per method", "log10(prompt / gate grad)", gap_threshold)
    curves("gate/mean", "Gate trajectories", "mean σ(g)")
    curves("mask/active_tokens", "Active prompt tokens", "tokens")

    def scatter(pairs: list[tuple[str, float, float]], title: str, xlabel: str, logx: bool = False) -> None:
        if not pairs:
            return
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for m in methods:
            pts = [(x, y) for mm, x, y in pairs if mm == m]
            if pts:
                ax.scatter(*zip(*pts), color=colour[m], label=m)
        ax.set(title=title, xlabel=xlabel, ylabel="HM accuracy (%)")
        if logx:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
        plots.append((title, _png(fig)))

    scatter([(r.method, r.t_target, r.acc_hm) for r in report.runs if r.t_target is not None and r.acc_hm is not None],
            "Accuracy vs T_target", "T_target")
    scatter([(r.method, r.trainable_params, r.acc_hm) for r in report.runs
             if r.trainable_params and r.acc_hm is not None], "Accuracy vs trainable parameters",
            "trainable parameters", logx=True)
    plots += _intervals(report, colour) + _phase_map(report)
    if client is not None:
        plots += _mask_heatmaps(report, client)
    return plots


def _intervals(report: Report, colour: dict[str, Any]) -> list[tuple[str, str]]:
    # Each method's HM mean with its bootstrap 95% interval: do the methods' intervals overlap?
    import matplotlib.pyplot as plt

    groups = [g for g in report.to_json()["groups"] if g["acc_hm_mean"] is not None]
    if not any(g["acc_hm_ci"] for g in groups):
        return []
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(groups) + 1.2))
    for i, g in enumerate(groups):
        low, high = g["acc_hm_ci"] or (g["acc_hm_mean"], g["acc_hm_mean"])
        ax.errorbar(g["acc_hm_mean"], i, xerr=[[g["acc_hm_mean"] - low], [high - g["acc_hm_mean"]]], fmt="o",
                    color=colour[g["method"]], capsize=4)
    ax.set_yticks(range(len(groups)), [f"{g['method']} (n={g['n_runs']})" for g in groups])
    ax.set(title="HM accuracy, mean and bootstrap 95% interval", xlabel="HM accuracy (%)")
    return [("HM accuracy with 95% intervals", _png(fig))]


def _phase_map(report: Report) -> list[tuple[str, str]]:
    # The two settings that most decide collapse as axes, each trial a point coloured by its verdict.
    import matplotlib.pyplot as plt
    import numpy as np

    from mlgate.compare.analysis import phase_axes, sampled_study
    from mlgate.compare.stats import _value

    axes = phase_axes(report.importance)
    study, runs = sampled_study(report.runs)
    if not axes or not runs:
        return []
    rng = np.random.default_rng(0)

    def coordinates(key: str) -> tuple[list[float], list[str] | None]:
        values = [_value(r.sampled.get(key)) for r in runs]
        if all(isinstance(v, float) for v in values):
            return values, None
        labels = sorted({str(v) for v in values})  # categories at integer positions, a little jitter
        return [labels.index(str(v)) + rng.uniform(-0.15, 0.15) for v in values], labels

    x, x_labels = coordinates(axes[0])
    if len(axes) > 1:
        y, y_labels = coordinates(axes[1])
    else:
        y, y_labels = [r.acc_hm if r.acc_hm is not None else float("nan") for r in runs], None
    palette = {"collapsed": "tab:red", "adaptive": "tab:green", "pruned": "tab:blue", "static": "tab:gray"}
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for verdict, color in palette.items():
        pts = [(a, b) for a, b, r in zip(x, y, runs) if r.verdict == verdict]
        if pts:
            ax.scatter(*zip(*pts), color=color, label=verdict, alpha=0.8)
    for values, labels, scale in ((x, x_labels, ax.set_xscale), (y, y_labels, ax.set_yscale)):
        if labels:
            (ax.set_xticks if scale == ax.set_xscale else ax.set_yticks)(range(len(labels)), labels)
        elif min(values) > 0 and max(values) / min(values) > 20:  # a range sampled on a log scale, most likely
            scale("log")
    ax.set(title=f"Phase map of study {study}: what decides collapse", xlabel=axes[0],
           ylabel=axes[1] if len(axes) > 1 else "HM accuracy (%)")
    ax.legend(fontsize=8)
    return [("Phase map: the two settings that most decide collapse, trials coloured by verdict", _png(fig))]


def _read_missing(report: Report, client: MlflowClient, keys: tuple[str, ...]) -> None:
    missing = {r.run_id: wanted for r in report.runs
               if (wanted := [k for k in keys if k in r.history_keys and k not in r.history])}
    if missing:
        histories = read_histories(client, missing)
        for r in report.runs:
            r.history.update(histories.get(r.run_id, {}))


def _mask_heatmaps(report: Report, client: MlflowClient, limit: int = 6) -> list[tuple[str, str]]:
    # The latest mask .npy of each pruning run (rows = depth, columns = token slot).
    import matplotlib.pyplot as plt
    import numpy as np

    out = []
    for run in [r for r in report.runs if r.active_tokens is not None][:limit]:
        try:
            files = sorted(a.path for a in client.list_artifacts(run.run_id, "masks") if a.path.endswith(".npy"))
        except Exception:  # noqa: BLE001 - an unreachable artifact store must not sink the report
            continue
        if not files:
            continue
        mask = np.load(client.download_artifacts(run.run_id, files[-1]))
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.imshow(np.atleast_2d(mask), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=f"{run.run_name}: {files[-1]}", xlabel="token slot", ylabel="depth")
        out.append((f"Mask of {run.run_name}", _png(fig)))
    return out


def render_html(report: Report, client: MlflowClient | None = None, gap_threshold: float = 2.0) -> str:
    """A self-contained HTML page: the tables and the plots (PNG embedded as data URIs)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>mlgate.compare — {html.escape(report.experiment)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "figure{display:inline-block;margin:0.5em}</style></head><body>",
        f"<h1>mlgate.compare — experiment <code>{html.escape(report.experiment)}</code></h1>",
        f"<p>{len(report.runs)} runs" + (f", in the <a href='{html.escape(report.ui)}'>MLflow UI, training view</a>"
                                           if report.ui else "") + ".</p>",
    ]
    for title, columns, rows in _sections(report):
        parts.append(f"<h2>{html.escape(title)}</h2><table><tr>"
                     + "".join(f"<th>{html.escape(n)}</th>" for n, _ in columns) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts += [f"<p class='note'>{html.escape(note)}</p>" for note in report.to_json()["notes"]]
    parts.append("<h2>Plots</h2>")
    for title, png in _plots(report, client, gap_threshold):
        parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>"
                     f"<figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
