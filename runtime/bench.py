"""`flexrank bench DIST_DIR --profiles a,b,c`: per device tier, measured host figures
(onnxruntime, threads capped to the profile's) beside predicted device figures.

Writes DIST_DIR/bench/bench.json and bench.png (outside the manifest, so the bundle's
sha256s stay valid). Host runs are shared between tiers with the same thread count.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flexrank.budget import same_budget
from flexrank.device.decide import Candidate, Quality, check_targets, decide
from flexrank.device.host import resolve_measured
from flexrank.device.predict import efficiency_for, predict
from flexrank.device.profiles import load_profile
from flexrank.planning.costs import BudgetCost

logger = logging.getLogger(__name__)

DEFAULT_PROFILES = "pixel8,laptop-x86,server-x86"
# The runtime that runs each export format (the runtime never imports the exporters).
FORMAT_RUNTIME = {"onnx": "onnxruntime", "ort": "onnxruntime", "executorch": "executorch"}


def manifest_candidates(deployment) -> list[Candidate]:
    """Every (β, precision) candidate the export's decision weighed, with its cost and
    measured quality, from the manifest (empty for a bundle exported without a profile)."""
    found: dict[tuple[float, str], Candidate] = {}
    for decision in (deployment.profiles or {}).values() if deployment else ():
        for row in decision.get("budgets", []):
            if not row.get("cost"):
                continue
            q = row.get("quality")
            quality = None if not q else Quality.from_row(q)
            key = (row["beta"], row.get("precision", "fp32"))
            found.setdefault(key, Candidate(BudgetCost(**row["cost"]), key[1], quality))
    return list(found.values())


def _as_shipped(profile, manifest):
    """(the profile running the bundle's runtime, that runtime's efficiency at the
    bundle's precision): predictions are of what is shipped."""
    shipped = profile.running(FORMAT_RUNTIME.get(str(manifest.export_format), profile.runtime))
    precision = str(manifest.quantize) if manifest.quantize else "fp32"
    try:
        return shipped, efficiency_for(shipped, precision)
    except ValueError:  # a precision the latency model has no factors for
        return shipped, None


def tier_decision(candidates: list[Candidate], shipped) -> dict | None:
    """The decision for one tier over the bundle's candidates at the precisions its
    runtime ships, `shipped` being the tier's profile running the bundle's runtime
    (`_as_shipped`); None without such candidates."""
    candidates = [c for c in candidates if c.precision in shipped.precisions()]
    if not candidates:
        return None
    decision = decide(candidates, shipped)
    return {"chosen_beta": decision.beta, "chosen_precision": decision.precision,
            "explanation": decision.explanation, "runtime": shipped.runtime,
            "candidates": [{"beta": r.beta, "precision": r.precision, "fits": r.fits,
                            "chosen": r is decision.chosen,
                            "decode_tokens_per_s": r.prediction.decode_tokens_per_s,
                            "ttft_s": r.prediction.ttft_s, "size_mb": r.size_mb,
                            "ppl": None if r.quality is None else r.quality.ppl,
                            "kl": None if r.quality is None else r.quality.kl,
                            # the decision's measure by model kind: ppl, cosine or top1
                            "metric": None if r.quality is None else r.quality.metric,
                            "quality": None if r.quality is None else r.quality.value}
                           for r in decision.rows]}


def bench(dist_dir, profile_names: list[str], new_tokens: int = 16) -> dict:
    """Measure every budget of the bundle for every profile; return the report dict."""
    from flexrank.device.host import host_key, host_threads
    from flexrank.manifest import load_manifest
    from flexrank.runtime.session import ElasticSession

    dist = Path(dist_dir)
    profiles = [load_profile(name) for name in profile_names]  # fail early on a bad name
    manifest = load_manifest(dist)
    session = None  # ExecuTorch programs are predicted only: ElasticSession runs onnxruntime
    if str(manifest.export_format) != "executorch":
        session = ElasticSession(dist, threads=host_threads(profiles[0]) if profiles else None,
                                 manifest=manifest)
    deployment = manifest.deployment
    costs = [BudgetCost(**c) for c in (deployment.budget_costs if deployment else [])]
    if not costs:
        raise ValueError(f"{dist} has no budget costs in its manifest: export it with "
                         "flexrank-export (a bundle from exporters.export alone has none)")
    candidates = manifest_candidates(deployment)
    measured: dict[tuple[int, int, float], dict] = {}
    tiers = []
    for profile in profiles:
        threads = host_threads(profile)
        prompt = profile.targets.prompt_tokens
        resolved = resolve_measured(profile)
        shipped, efficiency = _as_shipped(resolved, manifest)
        rows = []
        for cost in sorted(costs, key=lambda c: c.beta, reverse=True):
            prediction = predict(cost, shipped, efficiency)
            checks = check_targets(prediction, shipped, cost.encoder, cost=cost)
            exported = any(same_budget(cost.beta, b) for b in manifest.betas)
            row = {"beta": cost.beta, "exported": exported,
                   "predicted": {"label": "predicted", "ttft_s": prediction.ttft_s,
                                 "decode_tokens_per_s": prediction.decode_tokens_per_s,
                                 "memory_gb": prediction.memory_bytes / 1e9,
                                 "fits": all(c.passed for c in checks)},
                   "weights": {"bytes": cost.weight_bytes_total, "whole_kept": cost.whole_kept},
                   "measured": None}
            if row["exported"] and session is not None:
                key = (threads, prompt, cost.beta)
                if key not in measured:
                    logger.debug("measuring β %g with %d threads, prompt %d", cost.beta, threads,
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
                      "rows": rows,
                      "decision": tier_decision(candidates, shipped)})
    return {"bundle": str(dist), "host": host_key(), "kind": manifest.kind, "tiers": tiers}


