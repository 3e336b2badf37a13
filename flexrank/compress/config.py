"""The compress stage's configs: frozen dataclasses grouped by concern, validated on
construction, serialised with a type and version tag (`to_dict`) and read back
(`from_dict`). torch-free, so the command line can build its parsers without torch.

Modes, samplers and methods are str-Enums: `ProbeMode.FAST == "fast"`, so plain strings
are accepted wherever an Enum is expected and JSON holds the plain string.
"""

from __future__ import annotations

import enum
import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields, replace

from flexrank.budget import same_budget

# Eigenvalues of Σ below EIGEN_FLOOR · λ_max are clamped to it: directions the data never
# visits get a tiny, but invertible, weight instead of an infinite inverse.
EIGEN_FLOOR = 1e-8
# Σ of an n-wide input from N tokens has rank at most N, and its small eigenvalues are noisy
# long before N < n. compress's default calibration (128 sequences of 256 tokens) gives 21
# tokens per input dimension on SmolLM2-135M's widest input (1536, the MLP down projection);
# collect_covariances warns below 16, on the tokens it actually saw.
RECOMMENDED_TOKENS_PER_DIM = 16


class SvdMethod(enum.StrEnum):
    DATA = "data"  # whitened SVD from activation covariances (DataSVD)
    PLAIN = "plain"  # SVD of W alone


class ProbeMode(enum.StrEnum):
    EXACT = "exact"  # every candidate rank of every layer is measured
    FAST = "fast"  # `probe_points` ranks per layer, the rest interpolated
    # every rank of every layer from a second-order (Fisher) estimate of the KL: a few
    # backward passes of the whole model instead of passes per layer and rank
    FISHER = "fisher"
    AUTO = "auto"  # fisher for language models with linear nested layers, fast otherwise


class Sampler(enum.StrEnum):
    UNIFORM = "uniform"  # one budget per step, uniformly
    WEIGHTED = "weighted"  # one budget per step, by budget_weights
    SANDWICH = "sandwich"  # the largest, the smallest and one other budget each step


class Objective(enum.StrEnum):
    """What distillation matches (`flexrank.compress.objectives`)."""

    AUTO = "auto"  # by the teacher's output: token_kl, class_kl or feature
    TOKEN_KL = "token_kl"  # KL on per-token logits (causal LMs)
    CLASS_KL = "class_kl"  # KL on class logits (classifiers: ViT, CNN, BERT with a head)
    FEATURE = "feature"  # cosine + normalised MSE on the last hidden state (encoders)


class QatScheme(enum.StrEnum):
    """The 4-bit weights quantization-aware distillation trains for (compress/qat.py)."""

    INT4 = "int4"  # onnxruntime MatMulNBits: RTN blocks along K, symmetric
    W8DA4W = "8da4w"  # ExecuTorch/torchao: int8 dynamic activations, int4 grouped weights


# qat_block_size: what MatMulNBits (int4) and XNNPACK's 8da4w kernels (groups) take
QAT_BLOCK_SIZES = {"int4": (16, 32, 64, 128), "8da4w": (32, 64, 128, 256)}


class MixedPrecision(enum.StrEnum):
    AUTO = "auto"  # bf16 on CUDA, none on CPU
    NO = "no"
    BF16 = "bf16"


class FullBudget(enum.StrEnum):
    """What distillation does with the full budget, β = 1 (flexrank.compress.anchor)."""

    ANCHOR = "anchor"  # trained, then refit to the original weights after training
    REFIT = "refit"  # not trained (one budget less per step), refit after training
    TRAIN = "train"  # trained like every other budget, not refit (before issue 17)


SAMPLERS = tuple(Sampler)


def _enum(kind: type[enum.StrEnum], value, what: str):
    """`value` as a member of `kind`, or a ValueError naming the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not one of "
                         f"{', '.join(repr(m.value) for m in kind)}") from None


def _at_least(config, minimums: dict[str, int]) -> None:
    """Each named whole-number field of `config` at or above its minimum, or a ValueError
    naming the field, its value and the allowed range."""
    kind = type(config).__name__
    for name, low in minimums.items():
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{kind}.{name} {value!r} must be a whole number >= {low}")
        if value < low:
            raise ValueError(f"{kind}.{name} {value} is out of range: must be >= {low}")


def check_budgets(budgets: tuple[float, ...]) -> None:
    """Budgets as a plan takes them: at least one, each in (0, 1], no two the same (in any
    order: the plan sorts them). ValueError naming the offending budget otherwise."""
    if not budgets:
        raise ValueError("budgets is empty: give at least one budget in (0, 1]")
    for beta in budgets:
        if not 0 < beta <= 1:
            raise ValueError(f"budget {beta} is out of range (0, 1]")
    ordered = sorted(budgets)
    for low, high in zip(ordered[:-1], ordered[1:], strict=True):
        if same_budget(low, high):
            raise ValueError(f"budget {high} is given twice in {list(budgets)}: budgets must "
                             "be distinct")


def _checked_dict(cls, data: dict) -> dict:
    """`data` without its type tag, after checking the tag, the version and the keys."""
    data = dict(data)
    kind = data.pop("type", cls.__name__)
    if kind != cls.__name__:
        raise ValueError(f"a {kind} cannot be read as a {cls.__name__}")
    version = data.get("version", 1)
    if version != 1:
        raise ValueError(f"{cls.__name__} version {version} is not supported (this is "
                         "version 1): upgrade flexrank")
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    return data


@dataclass(frozen=True)
class FactorizeConfig:
    method: SvdMethod = SvdMethod.DATA
    eigen_floor: float = EIGEN_FLOOR  # relative floor on Σ's eigenvalues (see decompose.py)
    include_lm_head: bool = False  # small models spend a large share on a tied lm_head
    version: int = 1

    def __post_init__(self):
        object.__setattr__(self, "method", _enum(SvdMethod, self.method, "method"))
        if not 0 < self.eigen_floor < 1:
            raise ValueError(f"eigen_floor {self.eigen_floor} must be in (0, 1)")

    def to_dict(self) -> dict:
        return {"type": "FactorizeConfig", **json.loads(json.dumps(asdict(self)))}

    @classmethod
    def from_dict(cls, data: dict) -> FactorizeConfig:
        return cls(**_checked_dict(cls, data))


def without_inert_probe_settings(probe: dict) -> dict:
    """A ProbeConfig's dict less the settings that change nothing in the probe it asks
    for (top_k and fisher_points 0; fisher_draws and fisher_points outside the fisher and
    auto modes), so that what was saved before those settings existed compares equal."""
    fisher = probe.get("mode") in ("fisher", "auto")
    return {k: v for k, v in probe.items() if not (
        (k in ("top_k", "fisher_points") and v == 0)
        or (k in ("fisher_draws", "fisher_points") and not fisher))}


@dataclass(frozen=True)
class ProbeConfig:
    mode: ProbeMode = ProbeMode.FAST
    num_levels: int = 16  # candidate ranks per layer (the last is always full rank)
    rank_multiple: int = 8  # candidate ranks are multiples of this (32 before 4-bit groups)
    # ranks actually measured per layer in fast mode (1: the lowest level). With 1 point,
    # top-64 KL and 2 probe sequences SmolLM2's probe takes 3.5 min instead of 35-45 min
    # (3 points, full KL, 4 sequences), and its plans are within that default's own spread
    # over probe tokens (BENCHMARKS.md, issue 20, "Probing: the default's own spread")
    probe_points: int = 1
    # language models: KL over each token's top_k teacher tokens (0: the whole vocabulary);
    # the LM head computes only those rows (probe.Damage; BENCHMARKS.md, issue 20). Other
    # models ignore it; CompressConfig sets 0 with the depth axis (its probe's KL is whole)
    top_k: int = 64
    # fisher mode: labels sampled per token from the model's own distribution, one
    # backward pass per draw and probe batch (the estimate's noise falls as 1/√draws)
    fisher_draws: int = 8
    # fisher mode: levels measured per layer (as fast mode measures them) to rescale the
    # estimate, which a quadratic overstates or understates where the true KL bends
    # (0: the estimate alone)
    fisher_points: int = 0
    version: int = 1

    def __post_init__(self):
        object.__setattr__(self, "mode", _enum(ProbeMode, self.mode, "probe mode"))
        _at_least(self, {"num_levels": 2, "rank_multiple": 1, "probe_points": 1, "top_k": 0,
                         "fisher_draws": 1, "fisher_points": 0})

    def to_dict(self) -> dict:
        return {"type": "ProbeConfig", **json.loads(json.dumps(asdict(self)))}

    @classmethod
    def from_dict(cls, data: dict) -> ProbeConfig:
        return cls(**_checked_dict(cls, data))


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 200
    batch_size: int = 4  # global sequences per step (split across processes)
    grad_accum: int = 1  # micro-steps per optimizer step
    # The paper's 1e-5 is for 10k GPU steps of 512 x 1024 tokens. On SmolLM2-135M with
    # 2 x 256 tokens a step, 1e-4 drove β = 1 from KL 0 to 0.45 in 55 steps; 2e-5 with the
    # sandwich sampler improved every budget (BENCHMARKS.md, distillation).
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    objective: Objective = Objective.AUTO  # "auto": by what the teacher returns
    # > 0: adds this weight × per-block hidden-state matching (objectives.layer_loss) to
    # the output objective; for models whose forward takes output_hidden_states
    intermediate_weight: float = 0.0
    # True: before training, each rank component's U and V columns are scaled to equal
    # norms (layers.balance_factors_: every budget unchanged; AdamW then moves U and V at
    # the same relative pace). On all-MiniLM-L6-v2 at lr 2e-5 it removed the early dip of
    # the held-out cosine (BENCHMARKS.md, encoders); on tests/test_encoders.py's tiny random
    # BERT at lr 3e-4 it learnt less in 60 steps (β 0.4's held-out loss 0.94 → 0.86, short
    # of the test's 10 % fall, which it makes without), so it is not the default
    balance_factors: bool = False
    sampler: Sampler = Sampler.SANDWICH  # the largest anchors the factors
    # sampler="weighted": the probability of each budget (ascending, as the plan's);
    # "sandwich": of each budget as the random middle one (0: never trained)
    budget_weights: tuple[float, ...] | None = None
    uncertainty_weights: bool = False
    # The full budget (β = 1, every layer at full rank), trained like the others, ended at
    # +7 % perplexity (issue 17): "anchor" refits the columns only it reads to the
    # original weights after training (FullBudget; BENCHMARKS.md, issue 17).
    full_budget: FullBudget = FullBudget.ANCHOR
    train_all: bool = False  # False: only nested factors and their biases are trained
    # quantization-aware: every budget's forward uses the weights its `qat` export ships
    # (fake-quantized, straight-through gradients; ranks rounded to qat_block_size), and
    # evaluations during training are of those weights. None: float
    qat: QatScheme | None = None
    qat_block_size: int = 32  # the export's int4 block / 8da4w group size
    eval_every: int = 0  # steps; 0 = only before and after
    checkpoint_every: int = 50  # steps; 0 = only at the end
    mixed_precision: MixedPrecision = MixedPrecision.AUTO
    seed: int = 0
    version: int = 1

    def __post_init__(self):
        # seed >= 0: numpy's seeded generators refuse a negative one, mid-run
        _at_least(self, {"steps": 0, "batch_size": 1, "grad_accum": 1, "warmup_steps": 0,
                         "eval_every": 0, "checkpoint_every": 0, "seed": 0})
        object.__setattr__(self, "sampler", _enum(Sampler, self.sampler, "sampler"))
        object.__setattr__(self, "objective", _enum(Objective, self.objective, "objective"))
        object.__setattr__(self, "mixed_precision",
                           _enum(MixedPrecision, self.mixed_precision, "mixed_precision"))
        if self.budget_weights is not None:
            object.__setattr__(self, "budget_weights", tuple(self.budget_weights))
        if self.qat is not None:
            object.__setattr__(self, "qat", _enum(QatScheme, self.qat, "qat"))
            sizes = QAT_BLOCK_SIZES[self.qat]
            if self.qat_block_size not in sizes:
                raise ValueError(f"DistillConfig.qat_block_size {self.qat_block_size} does not "
                                 f"fit qat {self.qat.value!r}: choose one of {list(sizes)}")
        object.__setattr__(self, "full_budget",
                           _enum(FullBudget, self.full_budget, "full_budget"))
        if self.sampler == "weighted" and not self.budget_weights:
            raise ValueError("sampler 'weighted' needs budget_weights (one per budget)")
        if self.budget_weights and (min(self.budget_weights) < 0 or sum(self.budget_weights) <= 0):
            raise ValueError(f"budget_weights {self.budget_weights} must be >= 0, not all 0")
        for name, value, valid, allowed in (
                ("lr", self.lr, self.lr > 0, "> 0"),
                ("temperature", self.temperature, self.temperature > 0, "> 0"),
                ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
                ("intermediate_weight", self.intermediate_weight,
                 self.intermediate_weight >= 0, ">= 0"),
                ("min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                ("max_grad_norm", self.max_grad_norm, self.max_grad_norm > 0, "> 0")):
            if not (valid and math.isfinite(value)):
                raise ValueError(f"DistillConfig.{name} {value} is out of range: must be "
                                 f"{allowed}")

    def to_dict(self) -> dict:
        return {"type": "DistillConfig", **json.loads(json.dumps(asdict(self)))}

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        return cls(**_checked_dict(cls, data))


@dataclass(frozen=True)
class DepthConfig:
    """How the depth probe chooses and measures stand-ins (issue 18; flexrank.compress.depth).

    max_replaced: fraction of the blocks that may be replaced (the candidates: those with
        the lowest cosine score); the others are never replaced and serve as donors.
    adapter_ranks: candidate adapter ranks, strictly ascending (the plan's levels); the
        stand-in stores the largest, each linear min(rank, min(m, n)).
    donor_window: donors considered per candidate: the nearest non-candidate blocks.
    eigen_floor: relative eigenvalue floor of the whitening (as FactorizeConfig's).
    """

    max_replaced: float = 0.5
    adapter_ranks: tuple[int, ...] = (8, 16, 32, 64)
    donor_window: int = 4
    eigen_floor: float = EIGEN_FLOOR

    def __post_init__(self):
        object.__setattr__(self, "adapter_ranks", tuple(int(a) for a in self.adapter_ranks))
        if not 0 < self.max_replaced < 1:
            raise ValueError(f"max_replaced = {self.max_replaced} must lie in (0, 1): some "
                             "blocks must stay to serve as donors")
        ranks = self.adapter_ranks
        if not ranks or ranks[0] < 1 or list(ranks) != sorted(set(ranks)):
            raise ValueError(f"adapter_ranks {ranks} must be positive and strictly ascending")
        if self.donor_window < 1:
            raise ValueError(f"donor_window = {self.donor_window} must be >= 1")
        if not 0 < self.eigen_floor < 1:
            raise ValueError(f"eigen_floor = {self.eigen_floor} must lie in (0, 1)")

    def to_dict(self) -> dict:
        """{"version": 1, fields...}: the form the depth probe's cache is keyed by."""
        return {"version": 1, **asdict(self), "adapter_ranks": list(self.adapter_ranks)}

    @classmethod
    def from_dict(cls, data: dict) -> DepthConfig:
        data = _checked_dict(cls, data)
        data.pop("version", None)
        return cls(**data)


@dataclass(frozen=True)
class CompressConfig:
    calib: str = "teacher"  # 'teacher', a text/.jsonl file or a datasets folder
    num_samples: int = 128
    seq_len: int = 256
    eval_samples: int = 16  # held-out sequences for the summary (0: none)
    batch_size: int = 8
    budgets: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    probe_samples: int = 2  # sequences used to probe (of the calibration set)
    distill: DistillConfig = field(default_factory=DistillConfig)
    factorize: FactorizeConfig = field(default_factory=FactorizeConfig)
    seed: int = 0
    # DataSVD's calibration hidden states: None in memory, a folder (one batch in memory
    # at a time; blockwise.factorize_blockwise_), "auto" (in the output folder when they
    # would not fit in memory). Not part of the resume signature: the factors are the same
    offload_hidden: str | None = None
    # the depth axis (issue 18): None plans ranks only; a DepthConfig adds the depth stage
    # (weight-shared stand-ins for whole blocks) and a joint plan
    depth: DepthConfig | None = None
    version: int = 1

    def __post_init__(self):
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        if self.depth is not None and self.probe.top_k:
            # the joint plan adds rank-probe KLs to the depth probe's whole-vocabulary KLs
            # (planning/depth.py): both must measure the same KL
            object.__setattr__(self, "probe", replace(self.probe, top_k=0))
        if self.offload_hidden is not None and (not isinstance(self.offload_hidden, str)
                                                or not self.offload_hidden.strip()):
            raise ValueError(f"offload_hidden {self.offload_hidden!r} must be None, 'auto' "
                             "or the path of a folder")
        check_budgets(self.budgets)
        # seq_len >= 2: the held-out perplexity predicts each next token of a sequence
        _at_least(self, {"num_samples": 1, "seq_len": 2, "eval_samples": 0, "batch_size": 1,
                         "probe_samples": 1, "seed": 0})
        if self.probe_samples < 1 or self.probe_samples > self.num_samples:
            raise ValueError(f"probe_samples {self.probe_samples} must be in [1, "
                             f"num_samples={self.num_samples}]")
        if not isinstance(self.calib, str) or not self.calib.strip():
            raise ValueError(f"calib {self.calib!r} must be 'teacher' or the path of a text "
                             "file, .jsonl file or datasets folder")
        weights = self.distill.budget_weights
        if weights is not None and len(weights) != len(self.budgets):
            raise ValueError(f"distill.budget_weights has {len(weights)} weights for "
                             f"{len(self.budgets)} budgets {list(self.budgets)}: give one "
                             "per budget, in ascending budget order")
        if weights is not None and self.distill.sampler == Sampler.WEIGHTED \
                and self.distill.full_budget == FullBudget.REFIT \
                and max(self.budgets) == 1.0 and not any(weights[:-1]):
            raise ValueError(f"distill.budget_weights {list(weights)} weigh only the full "
                             "budget, which full_budget 'refit' does not train: weigh a "
                             "smaller budget, or set full_budget 'anchor'")

    def to_dict(self) -> dict:
        return {"type": "CompressConfig", **json.loads(json.dumps(asdict(self)))}

    @classmethod
    def from_dict(cls, data: dict) -> CompressConfig:
        data = _checked_dict(cls, data)
        nested = {"probe": ProbeConfig, "distill": DistillConfig, "factorize": FactorizeConfig,
                  "depth": DepthConfig}
        for key, kind in nested.items():
            if isinstance(data.get(key), dict):
                data[key] = kind.from_dict({"type": kind.__name__, **data[key]})
        return cls(**data)

    def signature(self, model_id: str) -> dict:
        """What must match for a resume (distillation steps may grow)."""
        data = json.loads(json.dumps(asdict(self)))
        data.pop("version")
        data.pop("offload_hidden")  # where hidden states are kept changes no number
        data["distill"].pop("steps")
        data["distill"].pop("eval_every")
        data["distill"].pop("checkpoint_every")
        if data["distill"].get("qat") is None:  # folders from before QAT resume as they were
            data["distill"].pop("qat", None)
            data["distill"].pop("qat_block_size", None)
        # "anchor" trains as "train" (and as folders from before it) and only refits β = 1
        # afterwards, on every run: such folders resume, and are anchored when resumed
        if data["distill"].get("full_budget") != "refit":
            data["distill"].pop("full_budget", None)
        if not data["distill"].get("balance_factors"):  # as folders from before it
            data["distill"].pop("balance_factors", None)
        return {"model": model_id, **data}
