"""`--budget auto`: check each budget's predicted figures against a profile's targets and
choose the largest budget that meets them all (`Decision`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from flexrank.device.host import resolve_measured
from flexrank.device.predict import Efficiency, Prediction, default_efficiency, predict, value_of
from flexrank.device.profiles import DeviceProfile, load_profile
from flexrank.planning.costs import BudgetCost

logger = logging.getLogger(__name__)

GB = 1e9  # profiles use decimal units
MB = 1e6
BETA_LABEL = ("beta = kept fraction of the factorised layers' deployed parameters; whole kept "
              "= the whole model's resident weights against the uncompressed model's; weights "
              "MB = resident weights as deployed (after any quantization)")
AT_TARGET_RTOL = 1e-9  # a prediction exactly at its target passes; this absorbs float rounding


# ---------------------------------------------------------------------------------------
# --budget auto


@dataclass(frozen=True)
class TargetCheck:
    target: str  # "decode", "TTFT", "memory", "latency"
    predicted: float
    limit: float
    unit: str
    at_least: bool  # the prediction must be >= limit (else <= limit)

    @property
    def passed(self) -> bool:
        slack = AT_TARGET_RTOL * self.limit
        return self.predicted >= self.limit - slack if self.at_least \
            else self.predicted <= self.limit + slack

    @property
    def margin(self) -> float:
        """Signed relative distance from the limit: (predicted − limit) / limit."""
        return (self.predicted - self.limit) / self.limit

    def describe(self) -> str:
        """E.g. 'decode 12.3 tok/s < target 20 tok/s (−38 %)'."""
        ops = ("≥", "<") if self.at_least else ("≤", ">")
        op = ops[0] if self.passed else ops[1]
        percent = f"{self.margin * 100:+.0f} %".replace("-", "−")
        return (f"{self.target} {self.predicted:.3g} {self.unit} {op} target "
                f"{self.limit:g} {self.unit} ({percent})")


@dataclass(frozen=True)
class BudgetRow:
    prediction: Prediction
    checks: tuple[TargetCheck, ...]
    cost: BudgetCost | None = None  # what the prediction was made from

    @property
    def beta(self) -> float:
        return self.prediction.beta

    @property
    def fits(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[TargetCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)


@dataclass(frozen=True)
class Decision:
    """The largest budget meeting every target of a profile, with the evidence."""

    profile: DeviceProfile
    beta: float | None  # None when no budget fits
    rows: tuple[BudgetRow, ...]  # largest budget first
    efficiency: Efficiency
    explanation: str

    def table(self) -> str:
        p, t = self.profile, self.profile.targets
        lines = [f"Predicted on {p.name} ({p.tier}; {p.runtime}/{p.backend}, {p.threads} "
                 f"threads). Efficiency: {self.efficiency.source}.",
                 f"Targets: decode >= {t.decode_tokens_per_s:g} tok/s, TTFT <= {t.ttft_s:g} s "
                 f"for {t.prompt_tokens} prompt tokens, memory <= "
                 f"{value_of(p.model_memory_gb):g} GB (KV cache for {p.context_tokens} tokens)."]
        names = [c.target for c in self.rows[0].checks] if self.rows else []
        header = ["beta", *[f"{n} {c.unit}" for n, c in zip(names, self.rows[0].checks,
                                                             strict=True)], "fits",
                  "whole kept", "weights MB"]
        body = [[f"{r.beta:g}",
                 *[f"{c.predicted:.3g} {'ok' if c.passed else 'FAIL'}" for c in r.checks],
                 "yes" if r.fits else "no", *_size_cells(r.cost)] for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        for row in [header, *body]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        lines.append(BETA_LABEL)
        chosen = "none" if self.beta is None else f"beta {self.beta:g}"
        lines.append(f"Chosen: {chosen}. {self.explanation}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable; every figure is a prediction of the latency model."""
        p, t = self.profile, self.profile.targets
        return {
            "label": "predicted",
            "profile": p.name, "tier": p.tier, "runtime": p.runtime, "backend": p.backend,
            "threads": p.threads, "chosen_beta": self.beta, "explanation": self.explanation,
            "efficiency": asdict(self.efficiency),
            "targets": {"decode_tokens_per_s": t.decode_tokens_per_s, "ttft_s": t.ttft_s,
                        "prompt_tokens": t.prompt_tokens,
                        "encoder_latency_ms": t.encoder_latency_ms,
                        "model_memory_gb": value_of(p.model_memory_gb),
                        "context_tokens": p.context_tokens},
            "budgets": [{
                "beta": r.beta, "fits": r.fits,
                "ttft_s": r.prediction.ttft_s,
                "decode_tokens_per_s": r.prediction.decode_tokens_per_s,
                "decode_bound": r.prediction.decode_bound,
                "memory_gb": r.prediction.memory_bytes / GB,
                "checks": {c.target: {"predicted": c.predicted, "limit": c.limit,
                                      "unit": c.unit, "passed": c.passed, "margin": c.margin}
                           for c in r.checks},
            } for r in self.rows],
        }


def _size_cells(cost: BudgetCost | None) -> list[str]:
    """[whole-model fraction, resident weights MB] of one budget ('-' where not known)."""
    if cost is None:
        return ["-", "-"]
    whole = cost.whole_kept
    return ["-" if whole is None else f"{whole:.4f}", f"{cost.weight_bytes_total / MB:.3g}"]


def check_targets(prediction: Prediction, profile: DeviceProfile, encoder: bool = False,
                  ) -> tuple[TargetCheck, ...]:
    t = profile.targets
    memory = TargetCheck("memory", prediction.memory_bytes / GB, value_of(profile.model_memory_gb),
                         "GB", at_least=False)
    if encoder:
        if t.encoder_latency_ms is None:
            raise ValueError(f"profile {profile.name} ({profile.path or 'in memory'}) has no "
                             "targets.encoder_latency_ms, needed for an encoder model; add one")
        return (TargetCheck("latency", prediction.ttft_s * 1e3, t.encoder_latency_ms, "ms",
                            at_least=False), memory)
    return (TargetCheck("decode", prediction.decode_tokens_per_s, t.decode_tokens_per_s,
                        "tok/s", at_least=True),
            TargetCheck("TTFT", prediction.ttft_s, t.ttft_s, "s", at_least=False),
            memory)


def choose_budget(costs: list[BudgetCost], profile: DeviceProfile | str,
                  efficiency: Efficiency | None = None) -> Decision:
    """Pick the largest budget whose predicted latency and memory meet every target."""
    if not costs:
        raise ValueError("choose_budget needs at least one BudgetCost")
    betas = [c.beta for c in costs]
    if len(set(betas)) != len(betas):
        raise ValueError(f"duplicate budgets in {sorted(betas, reverse=True)}; give each once")
    if len({c.encoder for c in costs}) > 1:
        raise ValueError("costs mix encoder and decoder budgets; pass one model's budgets")
    profile = resolve_measured(load_profile(profile) if isinstance(profile, str) else profile)
    eff = efficiency or default_efficiency(profile)
    rows = []
    for cost in sorted(costs, key=lambda c: c.beta, reverse=True):
        prediction = predict(cost, profile, eff)
        rows.append(BudgetRow(prediction, check_targets(prediction, profile, cost.encoder),
                              cost))
    fitting = [r for r in rows if r.fits]
    chosen = fitting[0] if fitting else None
    return Decision(profile, chosen.beta if chosen else None, tuple(rows), eff,
                    _explain(rows, chosen, profile.name))


def _explain(rows: list[BudgetRow], chosen: BudgetRow | None, name: str) -> str:
    if chosen is None:
        smallest = rows[-1]
        fails = "; ".join(c.describe() for c in smallest.failures)
        return (f"No budget meets every target on {name}. Even the smallest, beta "
                f"{smallest.beta:g}, fails: {fails}. Offer smaller budgets, use a faster "
                "runtime or relax the profile's targets.")
    meets = ", ".join(c.describe() for c in chosen.checks)
    index = rows.index(chosen)
    if index == 0:
        return f"Beta {chosen.beta:g}, the largest budget offered, meets every target on " \
               f"{name}: {meets}."
    larger = rows[index - 1]
    fails = "; ".join(c.describe() for c in larger.failures)
    return (f"Beta {chosen.beta:g} is the largest budget that meets every target on {name}: "
            f"{meets}. The next larger, beta {larger.beta:g}, fails: {fails}.")


