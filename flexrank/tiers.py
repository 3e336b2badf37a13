"""`flexrank bench DIST_DIR --profiles a,b,c`: per device tier, measured host figures
(onnxruntime, threads capped to the profile's) beside predicted device figures.

Writes DIST_DIR/bench/bench.json and bench.png (outside the manifest, so the bundle's
sha256s stay valid). Host runs are shared between tiers with the same thread count.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flexrank.io import write_json_atomic
from flexrank.latency import BudgetCost, check_targets, predict, resolve_measured
from flexrank.profiles import load_profile

logger = logging.getLogger(__name__)

DEFAULT_PROFILES = "pixel8,laptop-x86,server-x86"


def bench(dist_dir, profile_names: list[str], new_tokens: int = 16) -> dict:
    """Measure every budget of the bundle for every profile; return the report dict."""
    from flexrank.deploy_cli import host_threads
    from flexrank.latency import host_key
    from flexrank.runtime import ElasticSession

    dist = Path(dist_dir)
    profiles = [load_profile(name) for name in profile_names]  # fail early on a bad name
    session = ElasticSession(dist, threads=host_threads(profiles[0]) if profiles else None)
    manifest = session.manifest
    costs = [BudgetCost(**c) for c in manifest.get("budget_costs") or []]
    if not costs:
        raise ValueError(f"{dist} has no budget costs in its manifest: export it with "
                         "flexrank-export (a bundle from exporters.export alone has none)")
    measured: dict[tuple[int, int, float], dict] = {}
    tiers = []
    for profile in profiles:
        threads = host_threads(profile)
        prompt = profile.targets.prompt_tokens
        resolved = resolve_measured(profile)
        rows = []
        for cost in sorted(costs, key=lambda c: c.beta, reverse=True):
            prediction = predict(cost, resolved)
            checks = check_targets(prediction, resolved, cost.encoder)
            row = {"beta": cost.beta, "exported": cost.beta in session.budgets,
                   "predicted": {"label": "predicted", "ttft_s": prediction.ttft_s,
                                 "decode_tokens_per_s": prediction.decode_tokens_per_s,
                                 "memory_gb": prediction.memory_bytes / 1e9,
                                 "fits": all(c.passed for c in checks)},
                   "measured": None}
            if row["exported"]:
                key = (threads, prompt, cost.beta)
                if key not in measured:
                    logger.info("measuring β %g with %d threads, prompt %d", cost.beta, threads,
                                prompt)
                    if threads != session.threads:  # a new onnxruntime session per count
                        session = ElasticSession(dist, cost.beta, threads, verify=False)
                    session.set_budget(cost.beta)
                    measured[key] = session.measure(prompt, new_tokens)
                row["measured"] = measured[key]
            rows.append(row)
        t = profile.targets
        tiers.append({"profile": profile.name, "tier": profile.tier, "threads": threads,
                      "profile_threads": profile.threads, "prompt_tokens": prompt,
                      "targets": {"decode_tokens_per_s": t.decode_tokens_per_s,
                                  "ttft_s": t.ttft_s, "encoder_latency_ms": t.encoder_latency_ms},
                      "rows": rows})
    return {"bundle": str(dist), "host": host_key(), "kind": manifest["kind"], "tiers": tiers}


def bench_table(report: dict) -> str:
    header = ["profile", "tier", "beta", "host thr", "host TTFT s", "host ms/tok med",
              "host ms/tok p90", "pred. TTFT s", "pred. tok/s", "pred. GB", "target tok/s",
              "fits (pred.)"]
    body = []
    for tier in report["tiers"]:
        for row in tier["rows"]:
            m, p = row["measured"], row["predicted"]
            body.append([tier["profile"], tier["tier"], f"{row['beta']:g}", str(tier["threads"]),
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
                 "predicted for the device by flexrank.latency, not measured")
    return "\n".join(lines)


def _f(measured: dict | None, key: str, fmt: str) -> str:
    if not measured or measured.get(key) is None:
        return "-"
    return fmt.format(measured[key])


def bench_plot(report: dict, path: Path) -> Path:
    """Budget vs decode ms/token per tier: predicted line, measured host points, target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set_ylabel("decode ms/token" if report["kind"] == "decoder" else "latency ms")
    ax.set_title("FlexRank budgets per device tier")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_bench(args) -> int:
    names = [n.strip() for n in args.profiles.split(",") if n.strip()]
    if not names:
        raise ValueError("--profiles is empty: give names like pixel8,laptop-x86")
    print(f"benchmarking {args.dist_dir} for {', '.join(names)} ...", flush=True)
    report = bench(args.dist_dir, names, new_tokens=args.tokens)
    print(bench_table(report))
    out = Path(args.dist_dir) / "bench"
    out.mkdir(exist_ok=True)
    write_json_atomic(out / "bench.json", json.loads(json.dumps(report)))
    plot = bench_plot(report, out / "bench.png")
    print(f"wrote {out / 'bench.json'} and {plot}")
    return 0
