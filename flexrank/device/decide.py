"""`--budget auto`: the (β, precision) pair to ship for a device profile (`Decision`).

Every candidate (a budget β at a precision one of the profile's runtimes ships) is
predicted on the device (`flexrank.device.predict`) with the efficiency of the runtime that
ships its precision (`DeviceProfile.runtime_for`: fp32 on the default runtime, 8da4w on
ExecuTorch, int8/int4 on onnxruntime), and checked against the targets: the profile's,
with the user's `Constraints` replacing them where given. The rule (DESIGN.md §6):

1. keep the candidates that meet every target (decode, TTFT, memory, download size);
2. among them find the best quality, measured per budget and precision (`Quality`,
   stored with the checkpoint; `flexrank.compress.quality`) by the objective of the
   model's kind: for an LM the lowest held-out perplexity; for an encoder the highest
   mean cosine of the pooled embedding to the original's; for a classifier the highest
   top-1 agreement with the original (ties: the lower class KL);
3. among those within `quality_tolerance` of it, ship the smallest, then the fastest.
   The tolerance is relative to the best in every case: perplexity ≤ best × (1 + tol);
   cosine or agreement ≥ best × (1 − tol) (0.01: within 1 % of the best).

Without measured quality the rule falls back to the largest budget at the highest
precision, and says so. When nothing fits, the explanation names each target that no
candidate meets and the shortfall of the closest one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

from flexrank.device.host import resolve_measured
from flexrank.device.predict import (
    PRECISION_BITS,
    Efficiency,
    Prediction,
    efficiency_for,
    predict,
    value_of,
)
from flexrank.device.profiles import DeviceProfile, load_profile
from flexrank.planning.costs import BudgetCost

logger = logging.getLogger(__name__)

GB = 1e9  # profiles use decimal units
MB = 1e6
BETA_LABEL = ("beta = kept fraction of the factorised layers' deployed parameters; whole kept "
              "= the whole model's resident weights against the uncompressed model's; weights "
              "MB = resident weights as deployed (after any quantization)")
AT_TARGET_RTOL = 1e-9  # a prediction exactly at its target passes; this absorbs float rounding
DEFAULT_QUALITY_TOLERANCE = 0.01  # 1 % perplexity (issue 17)


# ---------------------------------------------------------------------------------------
# Inputs: candidates, their measured quality, the user's constraints


@dataclass(frozen=True)
class Quality:
    """Held-out quality of one (β, precision), by model kind (exactly one of ppl, cosine,
    top1 is the decision's measure, `metric`):

    - LM: `ppl`, perplexity of the held-out text, and `kl`, the mean per-token
      KL(original ‖ candidate) in nats (None when the original was absent);
    - encoder: `cosine`, mean cosine of the pooled embedding to the original's, in
      [−1, 1], and `loss`, the feature objective (`objectives.feature_loss`);
    - classifier: `top1`, the share of inputs whose top class is the original's, in
      [0, 1], and `kl`, the class KL(original ‖ candidate), nats per input.

    Raises ValueError for a value out of its range, or none of ppl, cosine, top1."""

    ppl: float | None = None
    kl: float | None = None
    source: str = "measured"  # what was evaluated, on which text
    cosine: float | None = None
    top1: float | None = None
    loss: float | None = None

    def __post_init__(self):
        if self.ppl is not None and not (math.isfinite(self.ppl) and self.ppl >= 1):
            raise ValueError(f"Quality.ppl = {self.ppl} must be a finite perplexity >= 1")
        if self.kl is not None and not (math.isfinite(self.kl) and self.kl >= -1e-6):
            raise ValueError(f"Quality.kl = {self.kl} must be a finite KL >= 0")
        if self.cosine is not None and not (math.isfinite(self.cosine)
                                            and -1 - 1e-6 <= self.cosine <= 1 + 1e-6):
            raise ValueError(f"Quality.cosine = {self.cosine} must be a cosine in [-1, 1]")
        if self.top1 is not None and not (math.isfinite(self.top1) and 0 <= self.top1 <= 1):
            raise ValueError(f"Quality.top1 = {self.top1} must be a share in [0, 1]")
        if self.ppl is None and self.cosine is None and self.top1 is None:
            raise ValueError("Quality needs ppl (an LM), cosine (an encoder) or top1 (a "
                             "classifier)")

    @classmethod
    def from_row(cls, row: dict, source: str | None = None) -> Quality:
        """From a `flexrank.compress.quality` row (its objective decides the measure; a
        class_kl row's top1 is the decision's measure, a token_kl row's the perplexity),
        or from `asdict(Quality)` as a manifest stores it (no objective: the figure
        present decides). `source`: None keeps the row's ("measured" if it has none)."""
        objective = row.get("objective")
        if objective is None:
            objective = "token_kl" if row.get("ppl") is not None else "feature" \
                if row.get("cosine") is not None else "class_kl"
        source = source if source is not None else row.get("source", "measured")
        if objective == "feature":
            return cls(cosine=row["cosine"], loss=row.get("loss"), source=source)
        if objective == "class_kl":
            return cls(top1=row["top1"], kl=row.get("kl"), source=source)
        return cls(row["ppl"], row.get("kl"), source)

    @property
    def metric(self) -> str:
        """The decision's measure: "ppl" (lower is better), "cosine" or "top1" (higher)."""
        return "ppl" if self.ppl is not None else "cosine" if self.cosine is not None \
            else "top1"

    @property
    def value(self) -> float:
        return getattr(self, self.metric)

    def rank(self) -> tuple[float, float]:
        """A sort key, best first: the measure (negated when higher is better), then the
        KL or feature loss where known."""
        second = self.kl if self.kl is not None else self.loss
        value = self.value if self.metric == "ppl" else -self.value
        return value, math.inf if second is None else second

    def bound(self, tolerance: float) -> float:
        """The worst value within `tolerance` of this one (relative): ppl × (1 + tol), or
        cosine / top1 × (1 − tol)."""
        return self.value * (1 + tolerance) if self.metric == "ppl" \
            else self.value * (1 - tolerance)

    def within(self, bound: float) -> bool:
        slack = AT_TARGET_RTOL * abs(bound)
        return self.value <= bound + slack if self.metric == "ppl" \
            else self.value >= bound - slack

    def describe(self) -> str:
        """'ppl 47.1', 'cosine 0.9752', 'top-1 0.96'."""
        name = {"ppl": "ppl", "cosine": "cosine", "top1": "top-1"}[self.metric]
        return f"{name} {self.value:.4g}"


@dataclass(frozen=True)
class Candidate:
    """One thing `--budget auto` may ship: budget β at a precision, what it costs per token
    as deployed at that precision, and its measured quality (None: not measured)."""

    cost: BudgetCost
    precision: str = "fp32"
    quality: Quality | None = None

    def __post_init__(self):
        if self.precision not in PRECISION_BITS:
            raise ValueError(f"precision {self.precision!r} is not one of "
                             f"{', '.join(PRECISION_BITS)}")

    @property
    def beta(self) -> float:
        return self.cost.beta

    @property
    def size_mb(self) -> float:
        """Download size of the weights as deployed, MB (decimal)."""
        return self.cost.weight_bytes_total / MB

    def label(self) -> str:
        return f"β {self.beta:g} {self.precision}"


@dataclass(frozen=True)
class Constraints:
    """The user's targets (`--max-size`, `--max-memory`, `--min-decode`, `--max-ttft`,
    `--quality-tolerance`); each given one replaces the profile's, or adds a target the
    profile does not have (download size)."""

    max_size_mb: float | None = None
    max_memory_gb: float | None = None
    min_decode_tokens_per_s: float | None = None
    max_ttft_s: float | None = None
    quality_tolerance: float = DEFAULT_QUALITY_TOLERANCE

    def __post_init__(self):
        flags = {"max_size_mb": "--max-size", "max_memory_gb": "--max-memory",
                 "min_decode_tokens_per_s": "--min-decode", "max_ttft_s": "--max-ttft"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} {value} must be a positive number")
        if not (math.isfinite(self.quality_tolerance) and 0 <= self.quality_tolerance < 1):
            raise ValueError(f"--quality-tolerance {self.quality_tolerance} must be in [0, 1) "
                             "(a fraction of the best quality: 0.01 = within 1 % of the best "
                             "perplexity, cosine or top-1 agreement)")


@dataclass(frozen=True)
class Limit:
    value: float
    source: str  # "profile <name>", "--max-size", …


def limits_for(profile: DeviceProfile, constraints: Constraints, encoder: bool,
               ) -> dict[str, Limit]:
    """{target: Limit}: the profile's targets with the user's constraints over them."""
    t, c, name = profile.targets, constraints, f"profile {profile.name}"
    limits: dict[str, Limit] = {}
    if encoder:
        if t.encoder_latency_ms is None:
            raise ValueError(f"profile {profile.name} ({profile.path or 'in memory'}) has no "
                             "targets.encoder_latency_ms, needed for an encoder model; add one")
        limits["latency"] = Limit(t.encoder_latency_ms, name)
    else:
        limits["decode"] = Limit(c.min_decode_tokens_per_s, "--min-decode") \
            if c.min_decode_tokens_per_s else Limit(t.decode_tokens_per_s, name)
        limits["TTFT"] = Limit(c.max_ttft_s, "--max-ttft") if c.max_ttft_s \
            else Limit(t.ttft_s, name)
    limits["memory"] = Limit(c.max_memory_gb, "--max-memory") if c.max_memory_gb \
        else Limit(value_of(profile.model_memory_gb), name)
    if c.max_size_mb:
        limits["size"] = Limit(c.max_size_mb, "--max-size")
    elif profile.download_limit_mb is not None:
        limits["size"] = Limit(value_of(profile.download_limit_mb), name)
    return limits


# ---------------------------------------------------------------------------------------
# Checks


@dataclass(frozen=True)
class TargetCheck:
    target: str  # "decode", "TTFT", "memory", "size", "latency"
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


_UNITS = {"decode": ("tok/s", True), "TTFT": ("s", False), "latency": ("ms", False),
          "memory": ("GB", False), "size": ("MB", False)}


def check_candidate(prediction: Prediction, cost: BudgetCost, limits: dict[str, Limit],
                    ) -> tuple[TargetCheck, ...]:
    """One check per limit, in the order of `limits`."""
    value = {"decode": prediction.decode_tokens_per_s, "TTFT": prediction.ttft_s,
             "latency": prediction.ttft_s * 1e3, "memory": prediction.memory_bytes / GB,
             "size": cost.weight_bytes_total / MB}
    return tuple(TargetCheck(target, value[target], limit.value, *_UNITS[target])
                 for target, limit in limits.items())


def check_targets(prediction: Prediction, profile: DeviceProfile, encoder: bool = False,
                  constraints: Constraints | None = None, cost: BudgetCost | None = None,
                  ) -> tuple[TargetCheck, ...]:
    """The checks of one prediction against a profile's targets (and the user's)."""
    limits = limits_for(profile, constraints or Constraints(), encoder)
    if cost is None:
        limits.pop("size", None)
        cost = BudgetCost(beta=prediction.beta, flops_per_token=1, weight_bytes_per_token=1,
                          weight_bytes_total=1, kv_bytes_per_token=0, n_layers=1)
    return check_candidate(prediction, cost, limits)


@dataclass(frozen=True)
class BudgetRow:
    """One candidate on the device: its prediction and its checks."""

    prediction: Prediction
    checks: tuple[TargetCheck, ...]
    cost: BudgetCost | None = None  # what the prediction was made from
    precision: str = "fp32"
    quality: Quality | None = None
    runtime: str = ""  # the runtime that ships this precision (its efficiency predicted it)

    @property
    def beta(self) -> float:
        return self.prediction.beta

    @property
    def fits(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[TargetCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def size_mb(self) -> float:
        return float("nan") if self.cost is None else self.cost.weight_bytes_total / MB

    def label(self) -> str:
        return f"β {self.beta:g} {self.precision}"

    def brief(self) -> str:
        """'β 0.8 int4 (ppl 47.1, 62 MB, 80 tok/s)'."""
        parts = [] if self.quality is None else [self.quality.describe()]
        parts.append(f"{self.size_mb:.3g} MB")
        if self.prediction.decode_tokens_per_s is not None:
            parts.append(f"{self.prediction.decode_tokens_per_s:.3g} tok/s")
        return f"{self.label()} ({', '.join(parts)})"


# ---------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class Decision:
    """The chosen (β, precision) for a profile, with the evidence and the reason."""

    profile: DeviceProfile
    chosen: BudgetRow | None  # None when no candidate meets every target
    rows: tuple[BudgetRow, ...]  # largest budget first, then the highest precision
    efficiency: Efficiency  # of the first precision; `efficiencies` has each
    explanation: str
    limits: dict[str, Limit] = field(default_factory=dict)
    quality_tolerance: float = DEFAULT_QUALITY_TOLERANCE
    efficiencies: dict[str, Efficiency] = field(default_factory=dict)

    @property
    def beta(self) -> float | None:
        return None if self.chosen is None else self.chosen.beta

    @property
    def precision(self) -> str | None:
        return None if self.chosen is None else self.chosen.precision

    @property
    def runtime(self) -> str | None:
        """The runtime that ships the chosen candidate (its artifact's format follows)."""
        return None if self.chosen is None else self.chosen.runtime

    def table(self, requested: float | str | None = None) -> str:
        """The candidates, the targets and the choice, as text. `requested`: the budget the
        user fixed (a β, or "all") when not "auto": the choice is then labelled as what
        --budget auto would ship, not what ships."""
        p = self.profile
        targets = ", ".join(f"{name} {'>=' if _UNITS[name][1] else '<='} {lim.value:g} "
                            f"{_UNITS[name][0]} ({lim.source})"
                            for name, lim in self.limits.items())
        effs = "; ".join(f"{prec}: {eff.source}" for prec, eff in self.efficiencies.items())
        # an encoder's target is the latency per inference: one forward of one input
        per_input = (f"latency per inference = one forward pass of one input of "
                     f"{self._input_described()} (batch 1)" if "latency" in self.limits
                     else f"TTFT for {p.targets.prompt_tokens} prompt tokens, memory with the "
                          f"KV cache for {p.context_tokens} tokens")
        runtimes = " or ".join(f"{r}/{b}" for r, b in p.runtimes())
        lines = [f"Predicted on {p.name} ({p.tier}; {runtimes}, {p.threads} "
                 f"threads). Efficiency: {effs}.",
                 f"Targets: {targets}; {per_input}."]
        names = [c.target for c in self.rows[0].checks] if self.rows else []
        metric = next((r.quality.metric for r in self.rows if r.quality is not None), "ppl")
        # the measure and its second figure, by model kind (Quality)
        first, second = {"ppl": ("ppl", "KL"), "cosine": ("cosine", "feat. loss"),
                         "top1": ("top-1", "KL")}[metric]
        several = len({r.runtime for r in self.rows}) > 1
        header = ["beta", "precision", *(["runtime"] if several else []), first, second,
                  *["ms/inference" if n == "latency" else f"{n} {_UNITS[n][0]}"
                    for n in names], "fits", "whole kept",
                  *([] if "size" in names else ["weights MB"]), ""]
        body = []
        for r in self.rows:
            q = r.quality
            extra = None if q is None else q.loss if metric == "cosine" else q.kl
            body.append([f"{r.beta:g}", r.precision, *([r.runtime] if several else []),
                         "-" if q is None else f"{q.value:.4g}",
                         "-" if extra is None else f"{extra:.3g}",
                         *[f"{c.predicted:.3g} {'ok' if c.passed else 'FAIL'}"
                           for c in r.checks],
                         "yes" if r.fits else "no",
                         *_size_cells(r.cost)[:1 if "size" in names else 2],
                         ("<- chosen" if requested is None else "<- auto's choice")
                         if r is self.chosen else ""])
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        for row in [header, *body]:
            lines.append("  ".join(cell.rjust(w) for cell, w in
                                   zip(row, widths, strict=True)).rstrip())
        measured = {"ppl": "ppl/KL = measured on held-out text (KL to the original model, "
                           "nats/token)",
                    "cosine": "cosine = mean cosine of the pooled embedding to the original "
                              "model's, feat. loss = the feature objective, measured on "
                              "held-out inputs",
                    "top1": "top-1 = share of held-out inputs whose top class is the "
                            "original model's, KL = class KL to it (nats/input)"}[metric]
        lines.append(BETA_LABEL.replace("weights MB", "size/weights MB")
                     + f"; {measured}; the rest predicted")
        chosen = "none" if self.chosen is None else self.chosen.label()
        if requested is None:
            lines.append(f"Chosen: {chosen}. {self.explanation}")
        else:
            asked = "every budget" if requested == "all" else f"β {requested:g}"
            lines.append(f"--budget auto would choose: {chosen}. {self.explanation} You asked "
                         f"for {asked}: that is what is exported.")
        return "\n".join(lines)

    def _input_described(self) -> str:
        """The input one inference is priced for: an image as counted ("pixel_values (1,
        3, 224, 224)"), else the profile's prompt_tokens tokens."""
        for row in self.rows:
            if row.cost is not None and row.cost.inference_input \
                    and not row.cost.inference_tokens:
                return row.cost.inference_input
        return f"{self.profile.targets.prompt_tokens} tokens"

    def to_dict(self) -> dict:
        """JSON-serialisable; latency and memory are predictions, quality is measured."""
        p, t = self.profile, self.profile.targets
        return {
            "label": "predicted",
            # the profile's default runtime; "runtimes" lists all, "chosen_runtime" ships
            "profile": p.name, "tier": p.tier, "runtime": p.runtime, "backend": p.backend,
            "threads": p.threads, "chosen_beta": self.beta, "chosen_precision": self.precision,
            "chosen_runtime": self.runtime,
            "runtimes": [f"{r}/{b}" for r, b in p.runtimes()],
            "explanation": self.explanation, "quality_tolerance": self.quality_tolerance,
            "efficiency": asdict(self.efficiency),
            "efficiencies": {k: asdict(v) for k, v in self.efficiencies.items()},
            "targets": {"decode_tokens_per_s": t.decode_tokens_per_s, "ttft_s": t.ttft_s,
                        "prompt_tokens": t.prompt_tokens,
                        "encoder_latency_ms": t.encoder_latency_ms,
                        "model_memory_gb": value_of(p.model_memory_gb),
                        "context_tokens": p.context_tokens},
            "limits": {k: {"value": v.value, "source": v.source} for k, v in self.limits.items()},
            "budgets": [{
                "beta": r.beta, "precision": r.precision, "runtime": r.runtime,
                "fits": r.fits, "chosen": r is self.chosen,
                "ttft_s": r.prediction.ttft_s,
                "decode_tokens_per_s": r.prediction.decode_tokens_per_s,
                "decode_bound": r.prediction.decode_bound,
                "inference_bound": r.prediction.inference_bound,
                "memory_gb": r.prediction.memory_bytes / GB,
                "size_mb": r.size_mb if r.cost is not None else None,
                "quality": None if r.quality is None else asdict(r.quality),
                "cost": None if r.cost is None else asdict(r.cost),
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


def decide(candidates: list[Candidate], profile: DeviceProfile | str,
           constraints: Constraints | None = None,
           efficiency: Efficiency | dict[str, Efficiency] | None = None) -> Decision:
    """Choose among `candidates` for `profile` by the rule of this module's docstring.

    `efficiency`: one for every precision (tests), {precision: Efficiency}, or None for
    `efficiency_for` of the runtime that ships each precision on `profile`
    (`DeviceProfile.runtime_for`). Candidates at a precision none of the profile's runtimes
    ships are refused (ValueError naming them), as are duplicates and a mix of encoder and
    decoder costs."""
    if not candidates:
        raise ValueError("decide needs at least one candidate (budget × precision)")
    keys = [(c.beta, c.precision) for c in candidates]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1}, reverse=True)
        raise ValueError(f"duplicate candidates {[f'{b:g} {p}' for b, p in dup]}; give each "
                         "(budget, precision) once")
    if len({c.cost.encoder for c in candidates}) > 1:
        raise ValueError("candidates mix encoder and decoder budgets; pass one model's budgets")
    profile = resolve_measured(load_profile(profile) if isinstance(profile, str) else profile)
    foreign = sorted({c.precision for c in candidates} - set(profile.precisions()))
    if foreign:
        raise ValueError(f"{profile.describe_runtimes()}; not {', '.join(foreign)}: leave "
                         "those precisions out")
    constraints = constraints or Constraints()
    limits = limits_for(profile, constraints, candidates[0].cost.encoder)
    # each precision is predicted as the runtime that ships it runs it
    shipped = {p: profile.running(profile.runtime_for(p))
               for p in dict.fromkeys(c.precision for c in candidates)}
    effs = {}
    for precision, device in shipped.items():
        effs[precision] = efficiency.get(precision) if isinstance(efficiency, dict) \
            else efficiency
        if effs[precision] is None:
            effs[precision] = efficiency_for(device, precision)
    rows = []
    order = sorted(candidates, key=lambda c: (-c.beta, -PRECISION_BITS[c.precision]))
    for cand in order:
        device = shipped[cand.precision]
        prediction = predict(cand.cost, device, effs[cand.precision])
        rows.append(BudgetRow(prediction, check_candidate(prediction, cand.cost, limits),
                              cand.cost, cand.precision, cand.quality, device.runtime))
    chosen, explanation = _choose(rows, profile.name, constraints.quality_tolerance)
    return Decision(profile, chosen, tuple(rows), effs[order[0].precision], explanation,
                    limits, constraints.quality_tolerance, effs)


def choose_budget(costs: list[BudgetCost], profile: DeviceProfile | str,
                  efficiency: Efficiency | None = None, precision: str = "fp32",
                  constraints: Constraints | None = None) -> Decision:
    """`decide` over one precision without measured quality: the largest fitting budget."""
    if not costs:
        raise ValueError("choose_budget needs at least one BudgetCost")
    betas = [c.beta for c in costs]
    if len(set(betas)) != len(betas):
        raise ValueError(f"duplicate budgets in {sorted(betas, reverse=True)}; give each once")
    return decide([Candidate(c, precision) for c in costs], profile, constraints, efficiency)


def _speed_key(row: BudgetRow) -> float:
    """Larger is faster: decode tok/s, or −latency for encoders."""
    rate = row.prediction.decode_tokens_per_s
    return rate if rate is not None else -row.prediction.ttft_s


def _choose(rows: list[BudgetRow], name: str, tolerance: float,
            ) -> tuple[BudgetRow | None, str]:
    fitting = [r for r in rows if r.fits]
    if not fitting:
        return None, _explain_none(rows, name)
    measured = [r for r in fitting if r.quality is not None]
    if not measured:
        chosen = fitting[0]  # rows are ordered largest β, highest precision first
        return chosen, _explain_unmeasured(rows, chosen, name)
    metrics = {r.quality.metric for r in measured}
    if len(metrics) > 1:
        raise ValueError(f"candidates measured by {sorted(metrics)}: one model's candidates "
                         "share one measure (ppl, cosine or top1)")
    best = min(measured, key=lambda r: (*r.quality.rank(), -r.beta))
    bound = best.quality.bound(tolerance)
    near = [r for r in measured if r.quality.within(bound)]
    chosen = min(near, key=lambda r: (r.size_mb, -_speed_key(r), r.quality.rank()))
    op = "<=" if best.quality.metric == "ppl" else ">="
    measure = best.quality.describe().split(" ")[0]
    runtimes = {r.runtime for r in rows}
    parts = [f"{chosen.brief()} ships on {name}"
             + (f", in {chosen.runtime}." if len(runtimes) > 1 else ".")]
    parts.append(f"{len(fitting)} of {len(rows)} candidates meet every target; the best "
                 f"quality among them is {best.brief()}.")
    if chosen is not best:
        others = len(near) - 1
        parts.append(f"{chosen.label()} is within the {tolerance:.3g} quality tolerance of it "
                     f"({chosen.quality.describe()} {op} {bound:.4g}) and the smallest and "
                     f"fastest of the {others + 1} that are ({chosen.size_mb:.3g} MB against "
                     f"{best.size_mb:.3g} MB).")
    elif len(near) > 1:
        parts.append(f"It is also the smallest and fastest of the {len(near)} within the "
                     f"{tolerance:.3g} quality tolerance.")
    else:
        parts.append(f"No other fitting candidate is within the {tolerance:.3g} quality "
                     f"tolerance ({measure} {op} {bound:.4g}).")
    better = [r for r in rows if not r.fits and r.quality is not None
              and r.quality.metric == chosen.quality.metric
              and r.quality.rank()[0] < chosen.quality.rank()[0]]
    if better:
        shown = "; ".join(f"{r.brief()}: {', '.join(c.describe() for c in r.failures)}"
                          for r in better[:3])
        more = f" (and {len(better) - 3} more)" if len(better) > 3 else ""
        parts.append(f"Better quality that does not fit: {shown}{more}.")
    unmeasured = [r for r in fitting if r.quality is None]
    if unmeasured:
        parts.append(f"Not compared (quality not measured): "
                     f"{', '.join(r.label() for r in unmeasured)}.")
    return chosen, " ".join(parts)


def _explain_unmeasured(rows: list[BudgetRow], chosen: BudgetRow, name: str) -> str:
    meets = ", ".join(c.describe() for c in chosen.checks)
    several = len({r.precision for r in rows}) > 1
    note = (" Quality is not measured, so the largest budget at the highest precision "
            "stands in for the best." if several else "")

    def name_of(row: BudgetRow) -> str:
        return f"beta {row.beta:g}" + (f" {row.precision}" if several else "")

    index = rows.index(chosen)
    if index == 0:
        return f"{name_of(chosen).capitalize()}, the largest budget offered, meets every " \
               f"target on {name}: {meets}.{note}"
    larger = rows[index - 1]
    fails = "; ".join(c.describe() for c in larger.failures)
    return (f"{name_of(chosen).capitalize()} is the largest budget that meets every target on "
            f"{name}: {meets}. The next larger, {name_of(larger)}, fails: {fails}.{note}")


def _explain_none(rows: list[BudgetRow], name: str) -> str:
    """Each target no candidate meets, with the closest candidate's shortfall."""
    unmet = []
    for i in range(len(rows[0].checks)):
        checks = [(r, r.checks[i]) for r in rows]
        if any(c.passed for _, c in checks):
            continue
        row, closest = min(checks, key=lambda rc: abs(rc[1].margin))
        short = abs(closest.predicted - closest.limit)
        unmet.append(f"{closest.describe()} at best ({row.label()}), short by "
                     f"{short:.3g} {closest.unit}")
    if not unmet:  # every target is met by some candidate, never all by one
        closest = min(rows, key=lambda r: sum(abs(c.margin) for c in r.failures))
        unmet = [f"the closest, {closest.label()}, fails {c.describe()}"
                 for c in closest.failures]
    return (f"No candidate meets every target on {name}: {'; '.join(unmet)}. Offer smaller "
            "budgets or a lower precision, use a faster runtime, or relax the target (the "
            "profile's, or --max-size/--max-memory/--min-decode/--max-ttft).")
