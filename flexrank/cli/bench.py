"""`flexrank bench DIST_DIR --profiles a,b,c`: the table and plot of
`flexrank.runtime.bench.bench`, written to DIST_DIR/bench/ (outside the manifest)."""

from __future__ import annotations

import json
from pathlib import Path

from flexrank.cli.compress import whole_number
from flexrank.device.decide import BETA_LABEL
from flexrank.exporters import BENCH_FOLDER
from flexrank.io import atomic_path, check_writable, write_json_atomic
from flexrank.runtime.bench import DEFAULT_PROFILES, bench


def bench_table(report: dict) -> str:
    if report.get("kind", "decoder") != "decoder":
        return _encoder_table(report)
    header = ["profile", "tier", "beta", "whole kept", "weights MB", "host thr", "host TTFT s",
              "host ms/tok med", "host ms/tok p90", "pred. TTFT s", "pred. tok/s", "pred. GB",
              "target tok/s", "fits (pred.)"]
    body = []
    for tier in report["tiers"]:
        for row in tier["rows"]:
            m, p = row["measured"], row["predicted"]
            body.append([tier["profile"], tier["tier"], f"{row['beta']:g}",
                         *_weights(row.get("weights")), str(tier["threads"]),
                         _f(m, "ttft_s", "{:.3f}"), _f(m, "decode_ms_median", "{:.1f}"),
                         _f(m, "decode_ms_p90", "{:.1f}"), f"{p['ttft_s']:.3f}",
                         "-" if p["decode_tokens_per_s"] is None
                         else f"{p['decode_tokens_per_s']:.1f}",
                         f"{p['memory_gb']:.2f}", f"{tier['targets']['decode_tokens_per_s']:g}",
                         "yes" if p["fits"] else "no"])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    lines.append(f"host = measured on {report['host']} in onnxruntime (threads capped to the "
                 "profile's and the host's cores; '-' = budget not in the bundle); pred. = "
                 "predicted for the device by flexrank.device.predict, not measured")
    lines.append(BETA_LABEL)
    return "\n".join(lines + _decision_lines(report))


def _decision_lines(report: dict) -> list[str]:
    """One line per tier that has a decision: what it chose and why."""
    lines = []
    for tier in report["tiers"]:
        d = tier.get("decision")
        if d:
            chosen = "nothing fits" if d["chosen_beta"] is None else \
                f"β {d['chosen_beta']:g} {d['chosen_precision']}"
            lines.append(f"{tier['profile']} ({d['runtime']}): {chosen}. {d['explanation']}")
    return lines


def _encoder_table(report: dict) -> str:
    """`bench_table` for an encoder or classifier bundle: latency per inference (one
    forward of one input, batch 1; DESIGN.md §6), measured on the host (median and p90 of
    `ElasticSession.measure`'s timed runs) and predicted on the device, against the
    profile's targets.encoder_latency_ms."""
    header = ["profile", "tier", "beta", "whole kept", "weights MB", "host thr",
              "host ms/inference med", "host ms/inference p90", "pred. ms/inference",
              "pred. GB", "target ms/inference", "fits (pred.)"]
    body = []
    for tier in report["tiers"]:
        target = tier["targets"].get("encoder_latency_ms")
        for row in tier["rows"]:
            m, p = row["measured"], row["predicted"]
            body.append([tier["profile"], tier["tier"], f"{row['beta']:g}",
                         *_weights(row.get("weights")), str(tier["threads"]),
                         _f(m, "latency_ms", "{:.2f}"), _f(m, "latency_ms_p90", "{:.2f}"),
                         f"{p['ttft_s'] * 1e3:.2f}", f"{p['memory_gb']:.2f}",
                         "-" if target is None else f"{target:g}",
                         "yes" if p["fits"] else "no"])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    inputs = {m["input"] for t in report["tiers"] for r in t["rows"]
              if (m := r["measured"]) and "input" in m}
    lines.append("ms/inference = one forward pass of one input (batch 1"
                 + (f": {', '.join(sorted(inputs))}" if inputs else "") + "); host = measured on "
                 f"{report['host']} in onnxruntime (threads capped to the profile's and the "
                 "host's cores; '-' = budget not in the bundle); pred. = predicted for the "
                 "device by flexrank.device.predict, not measured; target = the profile's "
                 "targets.encoder_latency_ms ('-': it has none)")
    lines.append(BETA_LABEL)
    return "\n".join(lines + _decision_lines(report))


def _weights(weights: dict | None) -> list[str]:
    """[whole-model fraction, resident weights MB] of one row ('-' where not known)."""
    if not weights:
        return ["-", "-"]
    whole = weights.get("whole_kept")
    return ["-" if whole is None else f"{whole:.4f}", f"{weights['bytes'] / 1e6:.3g}"]


def _f(measured: dict | None, key: str, fmt: str) -> str:
    if not measured or measured.get(key) is None:
        return "-"
    return fmt.format(measured[key])


def bench_plot(report: dict, path: Path) -> Path:
    """Left: budget vs decode ms/token (LMs) or ms per inference (encoders, classifiers)
    per tier (predicted line, measured host points, target). Right: measured quality
    against predicted latency of every (β, precision) candidate per tier, each tier's
    choice ringed (`quality_plot_data`; when the manifest holds the export's candidates
    and their quality)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = quality_plot_data(report)
    quality = any(t["points"] for t in data["tiers"])
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(13 if quality else 7, 4.8))
    ax = axes[0] if quality else axes
    for i, tier in enumerate(report["tiers"]):
        color = f"C{i}"
        betas = [r["beta"] for r in tier["rows"]]
        if report["kind"] == "decoder":
            pred = [1e3 / r["predicted"]["decode_tokens_per_s"] for r in tier["rows"]]
            target = 1e3 / tier["targets"]["decode_tokens_per_s"]
        else:
            pred = [r["predicted"]["ttft_s"] * 1e3 for r in tier["rows"]]
            target = tier["targets"]["encoder_latency_ms"]
        ax.plot(betas, pred, "-o", color=color, label=f"{tier['profile']} predicted")
        host = [(r["beta"], r["measured"].get("decode_ms_median", r["measured"].get("latency_ms")))
                for r in tier["rows"] if r["measured"]]
        if host:
            ax.plot(*zip(*host, strict=True), "x", color=color, markersize=10,
                    label=f"host, {tier['threads']} threads (measured)")
        if target:
            ax.axhline(target, color=color, linestyle="--", linewidth=1,
                       label=f"{tier['profile']} target")
    ax.set_xlabel("budget β (kept fraction of factorised parameters)")
    ax.set_ylabel("decode ms/token" if report["kind"] == "decoder" else "ms per inference")
    ax.set_title("FlexRank budgets per device tier")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if quality:
        _quality_panel(axes[1], data)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # a full disk leaves no half PNG
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# y-axis label of each quality measure (flexrank.device.decide.Quality.metric)
QUALITY_LABELS = {"ppl": "held-out perplexity (measured)",
                  "cosine": "held-out mean cosine of the pooled embedding to the original's "
                            "(measured)",
                  "top1": "held-out top-1 agreement with the original (measured)"}


def quality_plot_data(report: dict) -> dict:
    """What the quality panel plots, per tier: every candidate of its decision with a
    measured quality, x = its predicted latency on the tier (decode ms/token for an LM, ms
    per inference, batch 1, for an encoder or classifier), y = its quality by the model's
    kind (perplexity, cosine to the original, or top-1 agreement), whether it meets the
    tier's targets and whether it is the tier's choice.

    Returns {"x_label", "y_label", "metric", "tiers": [{"profile", "points": [{"beta",
    "precision", "x", "y", "fits", "chosen"}]}]}; a report from before the quality measure
    was stored per candidate (LMs: "ppl" only) reads as perplexity."""
    decoder = report.get("kind", "decoder") == "decoder"
    metrics, tiers = set(), []
    for tier in report["tiers"]:
        points = []
        for c in (tier.get("decision") or {}).get("candidates", []):
            metric = c.get("metric") or ("ppl" if c.get("ppl") is not None else None)
            value = c.get("quality", c.get("ppl")) if metric else None
            latency = (1e3 / c["decode_tokens_per_s"] if c.get("decode_tokens_per_s")
                       else None) if decoder else c["ttft_s"] * 1e3
            if value is None or latency is None:
                continue
            metrics.add(metric)
            points.append({"beta": c["beta"], "precision": c["precision"], "x": latency,
                           "y": value, "fits": c["fits"], "chosen": c["chosen"]})
        tiers.append({"profile": tier["profile"], "points": points})
    if len(metrics) > 1:
        raise ValueError(f"the bench report's candidates are measured by {sorted(metrics)}: "
                         "one bundle's candidates share one measure")
    metric = metrics.pop() if metrics else ("ppl" if decoder else None)
    return {"metric": metric,
            "x_label": ("decode ms/token" if decoder else "ms per inference, batch 1")
            + " (predicted on the tier, log)",
            "y_label": QUALITY_LABELS.get(metric, "quality (measured)"), "tiers": tiers}


def _quality_panel(ax, data: dict) -> None:
    """Quality (measured) vs latency (predicted), `quality_plot_data`: filled = meets
    every target of the tier, hollow = does not; the tier's choice ringed and labelled."""
    markers = {"fp32": "o", "int8": "s", "int4": "^", "8da4w": "D"}
    for i, tier in enumerate(data["tiers"]):
        color = f"C{i}"
        for c in tier["points"]:
            x, y = c["x"], c["y"]
            ax.plot(x, y, markers.get(c["precision"], "o"), color=color, markersize=6,
                    markerfacecolor=color if c["fits"] else "none")
            if c["chosen"]:
                ax.plot(x, y, "o", markersize=16, markerfacecolor="none", color=color,
                        markeredgewidth=2)
                ax.annotate(f"{tier['profile']}: β {c['beta']:g} {c['precision']}", (x, y),
                            textcoords="offset points", xytext=(8, 6 + 9 * i), fontsize=7,
                            color=color)
        ax.plot([], [], "o", color=color, label=tier["profile"])
    for precision, marker in markers.items():
        ax.plot([], [], marker, color="gray", markerfacecolor="none", label=precision)
    ax.set_xscale("log")
    ax.set_xlabel(data["x_label"])
    ax.set_ylabel(data["y_label"])
    ax.set_title("Quality vs latency; filled = meets the tier's targets, ring = its choice")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def cmd_bench(args) -> int:
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    if not names:
        raise ValueError("--profiles is empty: give names like pixel8,laptop-x86")
    out = Path(args.dist_dir) / BENCH_FOLDER  # inside the bundle, outside its manifest
    check_writable(out, "flexrank bench's output folder DIST_DIR/bench")  # before measuring
    print(f"benchmarking {args.dist_dir} for {', '.join(names)} ...", flush=True)
    report = bench(args.dist_dir, names, new_tokens=args.tokens)
    print(bench_table(report))
    write_json_atomic(out / "bench.json", json.loads(json.dumps(report)))
    plot = bench_plot(report, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {plot}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="per device tier: measured host figures and predicted "
                                     "device figures of a bundle, as a table and a PNG plot")
    p.add_argument("dist_dir", help="bundle folder written by flexrank-export")
    p.add_argument("--profiles", default=DEFAULT_PROFILES,
                   help=f"comma-separated profile names or YAML files (default: "
                        f"{DEFAULT_PROFILES})")
    p.add_argument("--tokens", type=whole_number(1), default=16,
                   help="decoded tokens timed per budget")
    p.set_defaults(func=cmd_bench)
