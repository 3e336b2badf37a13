"""Device profiles: one YAML file per device, loaded into one frozen, validated dataclass.

A profile names the hardware (SoC, cores, RAM, memory bandwidth, compute), the runtime
that will run the model there, and the targets a budget must meet (DESIGN.md §6). Every
hardware number is a mapping with its unit and where it comes from:

    memory_bandwidth_gbps:
      value: 68.3
      unit: GB/s
      source: "estimate: LPDDR5X, 4 channels x 16 bit x 8533 MT/s = 68.3 GB/s peak"

`source` names a datasheet or published measurement, or starts with `estimate:` and says
how the number was derived. Only the `host` tier may write `value: measured` (with a
`measured: …` source): `flexrank.device.host.resolve_measured` fills those in at run time.
Targets and runtime settings are plain numbers (they are requirements, not facts).

An optional `download_limit_mb` (a mapping with its source, like the hardware numbers) is
the largest download the app may ship: a store's cellular or base-module limit; the
decision checks each candidate's deployed weights against it (`flexrank.device.decide`).

`runtime`/`backend` name the device's default runtime. An optional `also_runs` lists the
other runtimes an app on the device can ship, each with the source that says so:

    also_runs:
      - runtime: onnxruntime
        backend: cpu
        source: "onnxruntime-genai's build.py --android --build_java (Java AAR)"

`--budget auto` then chooses among the precisions of every listed runtime (`precisions`),
each predicted with the efficiency of the runtime that ships it (`runtime_for`), and the
artifact follows the chosen one (a `.pte` for ExecuTorch, an `.onnx` folder for
onnxruntime-genai). fp32 is priced on the default runtime.

Units are decimal: 1 GB = 10⁹ bytes, 1 GB/s = 10⁹ bytes/s. `compute_gflops` is the peak
fp32 FMA throughput of the cores the runtime's threads run on; `memory_bandwidth_gbps`
is the peak DRAM bandwidth. What a runtime reaches of either is an efficiency factor of
the latency model (`flexrank.device.predict`), not part of the profile.

A user's own YAML file works wherever a shipped profile's name does.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from flexrank.device_profiles import PROFILE_DIR

TIERS = ("phone", "sbc", "laptop", "server", "host")
# (runtime, backend) pairs the latency model has efficiency factors for.
RUNTIME_BACKENDS = (("executorch", "xnnpack"), ("onnxruntime", "cpu"))
# The precisions each runtime ships (`--precision`): onnxruntime float32, dynamic int8 and
# 4-bit MatMulNBits; ExecuTorch/XNNPACK float32 and 8da4w (int8 dynamic activations, 4-bit
# grouped weights). The first is the runtime's float format.
RUNTIME_PRECISIONS = {"onnxruntime": ("fp32", "int8", "int4"), "executorch": ("fp32", "8da4w")}
MEASURED = "measured"
ESTIMATE = "estimate"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ProfileError(ValueError):
    """A profile file is malformed; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Quantity:
    """A hardware number with its unit and provenance. `value` is None only while a
    `measured` host quantity has not been measured yet."""

    value: float | None
    unit: str
    source: str

    @property
    def measured(self) -> bool:
        return self.source.startswith(MEASURED)

    @property
    def estimated(self) -> bool:
        return self.source.startswith(ESTIMATE)

    def __post_init__(self):
        if self.value is None and not self.measured:
            raise ValueError(f"value is missing and source {self.source!r} is not 'measured'")
        if self.value is not None and not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"value {self.value} must be a positive finite number")


@dataclass(frozen=True)
class Cores:
    description: str
    count: Quantity


@dataclass(frozen=True)
class RuntimeOption:
    """Another runtime an app on the device can ship (`also_runs`), with its source."""

    runtime: str
    backend: str
    source: str


@dataclass(frozen=True)
class Targets:
    """What a budget must meet on the device. `ttft_s` is the time to first token for a
    prompt of `prompt_tokens`; `encoder_latency_ms` applies to encoder models only."""

    decode_tokens_per_s: float
    ttft_s: float
    prompt_tokens: int
    encoder_latency_ms: float | None = None

    def __post_init__(self):
        for name in ("decode_tokens_per_s", "ttft_s", "encoder_latency_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"targets.{name} = {value} must be a positive number")
        if self.prompt_tokens < 1:
            raise ValueError(f"targets.prompt_tokens = {self.prompt_tokens} must be >= 1")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    tier: str
    soc: str
    cores: Cores
    ram_gb: Quantity
    model_memory_gb: Quantity  # memory an app may give the model (weights + KV + activations)
    memory_bandwidth_gbps: Quantity
    compute_gflops: Quantity
    runtime: str
    backend: str
    threads: int
    context_tokens: int  # the KV cache is allocated for this many tokens
    targets: Targets
    # The largest model download the app may ship (store cellular-download or base-module
    # limits), MB; None when nothing limits it.
    download_limit_mb: Quantity | None = None
    # Other runtimes an app on the device can ship, besides `runtime` (the default).
    also_runs: tuple[RuntimeOption, ...] = ()
    path: str = ""  # the file it was loaded from

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r} must be lower-case letters, digits and '-'")
        if self.tier not in TIERS:
            raise ValueError(f"tier {self.tier!r} is not one of {', '.join(TIERS)}")
        if (self.runtime, self.backend) not in RUNTIME_BACKENDS:
            known = ", ".join(f"{r}/{b}" for r, b in RUNTIME_BACKENDS)
            raise ValueError(f"runtime/backend {self.runtime}/{self.backend} is not supported "
                             f"by the latency model; use one of {known}")
        pairs = [(self.runtime, self.backend)] + [(o.runtime, o.backend) for o in self.also_runs]
        for runtime, backend in pairs[1:]:
            if (runtime, backend) not in RUNTIME_BACKENDS:
                known = ", ".join(f"{r}/{b}" for r, b in RUNTIME_BACKENDS)
                raise ValueError(f"also_runs {runtime}/{backend} is not supported by the "
                                 f"latency model; use one of {known}")
        runtimes = [r for r, _ in pairs]
        if len(set(runtimes)) != len(runtimes):
            raise ValueError(f"runtimes {', '.join(f'{r}/{b}' for r, b in pairs)} name a "
                             "runtime twice; list each once (the default in runtime/backend)")
        if self.threads < 1:
            raise ValueError(f"threads = {self.threads} must be >= 1")
        if self.context_tokens < self.targets.prompt_tokens:
            raise ValueError(f"context_tokens = {self.context_tokens} is smaller than "
                             f"targets.prompt_tokens = {self.targets.prompt_tokens}")
        ram, model = self.ram_gb.value, self.model_memory_gb.value
        if ram is not None and model is not None and model > ram:
            raise ValueError(f"model_memory_gb = {model} exceeds ram_gb = {ram}")
        count = self.cores.count.value
        if count is not None and self.threads > count:
            raise ValueError(f"threads = {self.threads} exceeds cores.count = {count:g}")
        measured = [n for n, q in self.quantities().items() if q.measured]
        if measured and self.tier != "host":
            raise ValueError(f"{measured[0]} is 'measured', which only the host tier can be; "
                             "give a value with a datasheet source or an estimate")

    def quantities(self) -> dict[str, Quantity]:
        """Every hardware number, by its dotted field name."""
        found = {"cores.count": self.cores.count, "ram_gb": self.ram_gb,
                 "model_memory_gb": self.model_memory_gb,
                 "memory_bandwidth_gbps": self.memory_bandwidth_gbps,
                 "compute_gflops": self.compute_gflops}
        if self.download_limit_mb is not None:
            found["download_limit_mb"] = self.download_limit_mb
        return found

    def runtimes(self) -> list[tuple[str, str]]:
        """[(runtime, backend)]: the default first, then `also_runs` in order."""
        return [(self.runtime, self.backend)] + [(o.runtime, o.backend) for o in self.also_runs]

    def precisions(self) -> tuple[str, ...]:
        """Every precision an app on the device can ship: the default runtime's, then what
        each other runtime adds (`RUNTIME_PRECISIONS`)."""
        found = [p for runtime, _ in self.runtimes() for p in RUNTIME_PRECISIONS[runtime]]
        return tuple(dict.fromkeys(found))

    def describe_runtimes(self) -> str:
        """'pixel8 runs executorch, onnxruntime, which ship fp32, 8da4w, int8, int4'."""
        runtimes = [r for r, _ in self.runtimes()]
        verb = "ship" if len(runtimes) > 1 else "ships"
        return (f"{self.name} runs {', '.join(runtimes)}, which {verb} "
                f"{', '.join(self.precisions())}")

    def runtime_for(self, precision: str) -> str:
        """The runtime that ships `precision` here: the default one when it does, else the
        first of `also_runs` that does. ValueError when none does."""
        for runtime, _ in self.runtimes():
            if precision in RUNTIME_PRECISIONS[runtime]:
                return runtime
        raise ValueError(f"{self.describe_runtimes()}; not {precision}")

    def running(self, runtime: str) -> DeviceProfile:
        """This profile with `runtime` (one of `runtimes()`, or any supported runtime when
        the user's --format names it) as its only runtime: predictions of an artifact for
        that runtime use its efficiency."""
        if runtime == self.runtime and not self.also_runs:
            return self
        backend = dict(self.runtimes()).get(runtime) or dict(RUNTIME_BACKENDS)[runtime]
        return replace(self, runtime=runtime, backend=backend, also_runs=())

    @property
    def is_resolved(self) -> bool:
        """True when no `measured` quantity is still waiting for its measurement."""
        return all(q.value is not None for q in self.quantities().values())


# Schema: field -> expected unit (Quantity), or python type for plain values.
_QUANTITY_UNITS = {"ram_gb": "GB", "model_memory_gb": "GB", "memory_bandwidth_gbps": "GB/s",
                   "compute_gflops": "GFLOP/s"}
_TOP_FIELDS = {f.name for f in fields(DeviceProfile)} - {"path"}
_TARGET_FIELDS = {f.name for f in fields(Targets)}
_OPTIONAL = {"targets.encoder_latency_ms", "download_limit_mb", "also_runs"}


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name (`pixel8`) or any profile YAML file by path."""
    path = _resolve_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML ({err}); fix the syntax") from err
    return parse_profile(raw, path)


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, ordered by tier (phone … host) then name."""
    profiles = [load_profile(p) for p in sorted(PROFILE_DIR.glob("*.yaml"))]
    return sorted(profiles, key=lambda p: (TIERS.index(p.tier), p.name))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profiles_table() -> str:
    """A text table of the shipped profiles and their targets."""
    header = ("name", "tier", "soc", "RAM GB", "model GB", "BW GB/s", "GFLOP/s",
              "runtime", "thr", "decode>=", "TTFT<=", "download<=")
    rows = [header]
    for p in list_profiles():
        t = p.targets
        rows.append((p.name, p.tier, p.soc, _fmt(p.ram_gb), _fmt(p.model_memory_gb),
                     _fmt(p.memory_bandwidth_gbps), _fmt(p.compute_gflops),
                     " + ".join(f"{r}/{b}" for r, b in p.runtimes()), str(p.threads),
                     f"{t.decode_tokens_per_s:g} tok/s", f"{t.ttft_s:g} s @{t.prompt_tokens}",
                     "-" if p.download_limit_mb is None else f"{_fmt(p.download_limit_mb)} MB"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("Hardware numbers are datasheet figures or marked estimates (see each YAML "
                 "file's source:); 'measured' ones are measured on this machine when used.")
    return "\n".join(lines)


def _fmt(q: Quantity) -> str:
    return MEASURED if q.value is None else f"{q.value:g}"


def _resolve_path(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    path = Path(text).expanduser()
    looks_like_path = isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) \
        or "/" in text or "\\" in text
    if looks_like_path:
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist; pass an existing YAML "
                               f"file or a shipped name ({', '.join(profile_names())})")
        return path
    shipped = PROFILE_DIR / f"{text}.yaml"
    if shipped.is_file():
        return shipped
    names = profile_names()
    close = difflib.get_close_matches(text, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ProfileError(f"unknown device profile {text!r}{hint}; shipped profiles: "
                       f"{', '.join(names)}; or pass the path of your own YAML file")


def parse_profile(raw: Any, path: Path | str = "<memory>") -> DeviceProfile:
    """Validate a parsed YAML mapping into a DeviceProfile; errors name field and file."""
    where = Path(path).name if str(path) != "<memory>" else "<memory>"
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: a profile must be a YAML mapping of fields, got "
                           f"{type(raw).__name__}")
    _check_keys(raw, _TOP_FIELDS, "", where)
    cores = _mapping(raw["cores"], "cores", where)
    _check_keys(cores, {"description", "count"}, "cores.", where)
    targets = _mapping(raw["targets"], "targets", where)
    _check_keys(targets, _TARGET_FIELDS, "targets.", where)
    try:
        return DeviceProfile(
            name=_text(raw["name"], "name", where),
            tier=_text(raw["tier"], "tier", where),
            soc=_text(raw["soc"], "soc", where),
            cores=Cores(_text(cores["description"], "cores.description", where),
                        _quantity(cores["count"], "cores.count", "cores", where)),
            **{k: _quantity(raw[k], k, unit, where) for k, unit in _QUANTITY_UNITS.items()},
            runtime=_text(raw["runtime"], "runtime", where),
            backend=_text(raw["backend"], "backend", where),
            threads=_integer(raw["threads"], "threads", where),
            context_tokens=_integer(raw["context_tokens"], "context_tokens", where),
            targets=Targets(
                decode_tokens_per_s=_number(targets["decode_tokens_per_s"],
                                            "targets.decode_tokens_per_s", where),
                ttft_s=_number(targets["ttft_s"], "targets.ttft_s", where),
                prompt_tokens=_integer(targets["prompt_tokens"], "targets.prompt_tokens", where),
                encoder_latency_ms=None if targets.get("encoder_latency_ms") is None else
                _number(targets["encoder_latency_ms"], "targets.encoder_latency_ms", where)),
            download_limit_mb=None if raw.get("download_limit_mb") is None else
            _quantity(raw["download_limit_mb"], "download_limit_mb", "MB", where),
            also_runs=_runtime_options(raw.get("also_runs"), where),
            path=str(path),
        )
    except ProfileError:
        raise
    except ValueError as err:  # a cross-field check in __post_init__: add the file
        raise ProfileError(f"{where}: {err}") from err


def _check_keys(raw: dict, allowed: set[str], prefix: str, where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ProfileError(f"{where}: unknown field {prefix}{unknown[0]}; allowed fields "
                           f"are {', '.join(sorted(allowed))} (check the spelling)")
    required = sorted(k for k in allowed if f"{prefix}{k}" not in _OPTIONAL)
    missing = [k for k in required if k not in raw]
    if missing:
        raise ProfileError(f"{where}: missing field {prefix}{missing[0]}; {prefix or 'a profile'}"
                           f" needs {', '.join(required)}")


def _runtime_options(raw: Any, where: str) -> tuple[RuntimeOption, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ProfileError(f"{where}: also_runs must be a list of {{runtime, backend, source}} "
                           f"mappings, got {raw!r}")
    options = []
    for index, item in enumerate(raw):
        field = f"also_runs[{index}]"
        _check_keys(_mapping(item, field, where), {"runtime", "backend", "source"},
                    f"{field}.", where)
        options.append(RuntimeOption(_text(item["runtime"], f"{field}.runtime", where),
                                     _text(item["backend"], f"{field}.backend", where),
                                     _text(item["source"], f"{field}.source", where)))
    return tuple(options)


def _mapping(value: Any, field: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: {field} must be a mapping, got {value!r}")
    return value


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProfileError(f"{where}: {field} must be a non-empty string, got {value!r}")
    return value.strip()


def _number(value: Any, field: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"{where}: {field} must be a number, got {value!r}; write the "
                           "bare number (the unit is fixed by the field)")
    if not (math.isfinite(value) and value > 0):
        raise ProfileError(f"{where}: {field} = {value} must be a positive number")
    return float(value)


def _integer(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{where}: {field} must be an integer, got {value!r}")
    if value < 1:
        raise ProfileError(f"{where}: {field} = {value} must be >= 1")
    return value


def _quantity(raw: Any, field: str, unit: str, where: str) -> Quantity:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: {field} is {raw!r}, a number without a source; write "
                           f"{{value: ..., unit: {unit}, source: ...}} naming a datasheet or "
                           "publication, or 'estimate: <how it was derived>'")
    _check_keys(raw, {"value", "unit", "source"}, f"{field}.", where)
    if raw["unit"] != unit:
        raise ProfileError(f"{where}: {field} has unit {raw['unit']!r} but must be given in "
                           f"{unit}; convert the value (units are decimal: 1 GB = 1e9 bytes)")
    source = raw["source"]
    if not isinstance(source, str) or not source.strip():
        raise ProfileError(f"{where}: {field} has an empty source; name a datasheet or "
                           "publication, or write 'estimate: <how it was derived>'")
    source = source.strip()
    if source.startswith(ESTIMATE) and len(source.rstrip(".: ")) <= len(ESTIMATE):
        raise ProfileError(f"{where}: {field} source {source!r} says estimate but not how; "
                           "write 'estimate: <derivation>', e.g. bus width x transfer rate")
    value = raw["value"]
    if value == MEASURED:
        if not source.startswith(MEASURED):
            raise ProfileError(f"{where}: {field} is measured, so its source must start with "
                               f"'measured:' and say how, got {source!r}")
        return Quantity(None, unit, source)
    return Quantity(_number(value, f"{field}.value", where), unit, source)
