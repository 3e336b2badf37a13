"""Device profiles: every shipped file loads, facts match their sources, and a broken file
fails with an error naming the field and the file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from flexrank.device.profiles import (
    TIERS,
    ProfileError,
    list_profiles,
    load_profile,
    profile_names,
    profiles_table,
)
from flexrank.device_profiles import PROFILE_DIR

SHIPPED = ["pixel8", "pixel6a", "galaxy-s22", "galaxy-s24", "oneplus12", "iphone15",
           "iphone15pro", "raspberry-pi5", "laptop-x86", "macbook-m2", "server-x86", "host",
           "android-go", "iphone15-extension", "pi-zero-2w"]


def pixel8_raw() -> dict:
    return yaml.safe_load((PROFILE_DIR / "pixel8.yaml").read_text())


def write(tmp_path: Path, raw, name: str = "my-phone.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


def test_every_shipped_profile_loads_and_is_named_after_its_file():
    assert sorted(profile_names()) == sorted(SHIPPED)
    for profile in list_profiles():
        assert Path(profile.path).stem == profile.name
        for field, q in profile.quantities().items():
            assert q.source, field
            if q.estimated:  # an estimate says how it was derived
                assert len(q.source) > len("estimate: ") + 20, (profile.name, field)
            if profile.tier != "host":
                assert q.value is not None and q.value > 0, (profile.name, field)
        assert profile.threads <= (profile.cores.count.value or profile.threads)


def test_list_profiles_is_ordered_by_tier_then_name():
    keys = [(TIERS.index(p.tier), p.name) for p in list_profiles()]
    assert keys == sorted(keys)


def test_published_facts_and_derived_estimates():
    pixel8 = load_profile("pixel8")
    assert pixel8.soc == "Google Tensor G3"
    assert pixel8.cores.count.value == 9 and pixel8.ram_gb.value == 8
    assert "Cortex-X3 2.91 GHz" in pixel8.cores.description
    # LPDDR5X, 4 channels x 16 bit x 8533 MT/s
    assert pixel8.memory_bandwidth_gbps.value == pytest.approx(4 * 16 / 8 * 8533e6 / 1e9, abs=0.05)
    # 1x X3 at 32 FLOP/cycle + 3x A715 at 16 FLOP/cycle
    assert pixel8.compute_gflops.value == pytest.approx(2.91 * 32 + 3 * 2.37 * 16, abs=0.05)
    assert load_profile("iphone15").ram_gb.value == 6
    assert load_profile("iphone15").soc == "Apple A16 Bionic"
    assert load_profile("iphone15pro").ram_gb.value == 8
    assert load_profile("iphone15pro").soc == "Apple A17 Pro"
    m2 = load_profile("macbook-m2").memory_bandwidth_gbps
    assert m2.value == 100 and not m2.estimated  # Apple's published figure


def test_targets_get_stricter_from_phone_to_laptop_to_server():
    phone, laptop, server = (load_profile(n).targets for n in ("pixel8", "laptop-x86",
                                                               "server-x86"))
    assert phone.decode_tokens_per_s < laptop.decode_tokens_per_s < server.decode_tokens_per_s
    assert phone.ttft_s > laptop.ttft_s > server.ttft_s
    assert phone.decode_tokens_per_s == 20 and phone.ttft_s == 1.0 and phone.prompt_tokens == 64


def test_phone_model_memory_is_a_fraction_of_ram():
    for p in list_profiles():
        if p.tier == "phone" and not p.name.endswith("-extension"):
            assert 0.2 <= p.model_memory_gb.value / p.ram_gb.value <= 0.4, p.name
    # an app extension gets its own small limit, not a share of the phone's RAM
    assert load_profile("iphone15-extension").model_memory_gb.value == 0.12


def test_binding_limits_carry_their_sources():
    """The limits that decide what a small model ships (issue 17): store download limits,
    a constrained app context, low-RAM tiers; each with a source or marked estimate."""
    for name in ("pixel8", "android-go", "pixel6a", "galaxy-s22", "galaxy-s24", "oneplus12"):
        limit = load_profile(name).download_limit_mb
        assert limit.value == 200 and "Google Play" in limit.source, name
    for name in ("iphone15", "iphone15-extension", "iphone15pro"):
        limit = load_profile(name).download_limit_mb
        assert limit.value == 200 and "Apple" in limit.source, name
    assert load_profile("server-x86").download_limit_mb is None
    go, zero = load_profile("android-go"), load_profile("pi-zero-2w")
    assert go.ram_gb.value == 2 and "Go edition" in go.ram_gb.source
    assert zero.ram_gb.value == 0.512 and "product brief" in zero.ram_gb.source
    assert zero.model_memory_gb.estimated and go.model_memory_gb.estimated
    assert "120 MB" in load_profile("iphone15-extension").model_memory_gb.source


def test_host_numbers_are_measured_not_written():
    host = load_profile("host")
    assert not host.is_resolved
    assert host.compute_gflops.measured and host.memory_bandwidth_gbps.measured
    assert host.compute_gflops.value is None


def test_a_user_path_works_like_a_name(tmp_path):
    raw = pixel8_raw()
    raw["name"] = "my-phone"
    path = write(tmp_path, raw)
    for ref in (path, str(path)):
        profile = load_profile(ref)
        assert profile.name == "my-phone" and profile.path == str(path)
        assert profile.targets == load_profile("pixel8").targets


def test_unknown_name_suggests_the_close_one():
    with pytest.raises(ProfileError, match=r"unknown device profile 'pixle8'.*did you mean "
                                           r"'pixel8'.*your own YAML"):
        load_profile("pixle8")
    with pytest.raises(ProfileError, match=r"nowhere\.yaml does not exist"):
        load_profile("/nowhere.yaml")


def _set(path: str, value):
    def mutate(raw):
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _delete(path: str):
    def mutate(raw):
        *parents, last = path.split(".")
        node = raw
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


BROKEN = [
    ("missing field", _delete("threads"), r"missing field threads"),
    ("missing nested field", _delete("targets.ttft_s"), r"missing field targets\.ttft_s"),
    ("missing source", _delete("ram_gb.source"), r"missing field ram_gb\.source"),
    ("unknown field", _set("thread", 4), r"unknown field thread;"),
    ("unknown nested field", _set("targets.ttft", 1.0), r"unknown field targets\.ttft;"),
    ("wrong unit", _set("ram_gb.unit", "MB"), r"ram_gb has unit 'MB' but must be given in GB"),
    ("wrong unit bandwidth", _set("memory_bandwidth_gbps.unit", "Gbit/s"),
     r"memory_bandwidth_gbps has unit 'Gbit/s'.*GB/s"),
    ("unit inside value", _set("ram_gb.value", "8 GB"), r"ram_gb\.value must be a number, got "
                                                         r"'8 GB'"),
    ("wrong type", _set("threads", "four"), r"threads must be an integer, got 'four'"),
    ("float threads", _set("threads", 2.5), r"threads must be an integer"),
    ("zero threads", _set("threads", 0), r"threads = 0 must be >= 1"),
    ("negative bandwidth", _set("memory_bandwidth_gbps.value", -5),
     r"memory_bandwidth_gbps\.value = -5 must be a positive number"),
    ("zero bandwidth", _set("memory_bandwidth_gbps.value", 0),
     r"memory_bandwidth_gbps\.value = 0 must be a positive"),
    ("number without source", _set("compute_gflops", 200.0),
     r"compute_gflops is 200\.0, a number without a source"),
    ("empty source", _set("ram_gb.source", ""), r"ram_gb has an empty source"),
    ("bare estimate", _set("ram_gb.source", "estimate"), r"ram_gb source 'estimate' says "
                                                          r"estimate but not how"),
    ("measured on a phone", _set("compute_gflops.value", "measured"),
     r"compute_gflops is measured, so its source must start with 'measured:'"),
    ("measured source on a phone", _set("compute_gflops", {"value": "measured",
                                                           "unit": "GFLOP/s",
                                                           "source": "measured: matmul"}),
     r"compute_gflops is 'measured', which only the host tier can be"),
    ("model memory above RAM", _set("model_memory_gb.value", 9),
     r"model_memory_gb = 9.0 exceeds ram_gb = 8.0"),
    ("unknown tier", _set("tier", "watch"), r"tier 'watch' is not one of"),
    ("unsupported backend", _set("backend", "coreml"),
     r"runtime/backend executorch/coreml is not supported.*onnxruntime/cpu"),
    ("negative target", _set("targets.decode_tokens_per_s", -1),
     r"targets\.decode_tokens_per_s = -1 must be a positive"),
    ("prompt beyond context", _set("targets.prompt_tokens", 4096),
     r"context_tokens = 2048 is smaller than targets\.prompt_tokens = 4096"),
    ("more threads than cores", _set("threads", 16), r"threads = 16 exceeds cores\.count = 9"),
]


@pytest.mark.parametrize("label,mutate,message", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_profile_names_field_and_file(tmp_path, label, mutate, message):
    raw = copy.deepcopy(pixel8_raw())
    mutate(raw)
    path = write(tmp_path, raw)
    with pytest.raises(ValueError, match=rf"my-phone\.yaml: .*{message}"):
        load_profile(path)


def test_download_limit_is_optional_and_checked(tmp_path):
    raw = pixel8_raw()
    del raw["download_limit_mb"]
    assert load_profile(write(tmp_path, raw)).download_limit_mb is None
    raw["download_limit_mb"] = {"value": 0.2, "unit": "GB", "source": "store"}
    with pytest.raises(ProfileError, match=r"my-phone.yaml: download_limit_mb has unit 'GB' "
                                           r"but must be given in MB"):
        load_profile(write(tmp_path, raw))
    raw["download_limit_mb"] = 200
    with pytest.raises(ProfileError, match=r"download_limit_mb is 200, a number without a "
                                           r"source"):
        load_profile(write(tmp_path, raw))


def test_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ProfileError, match=r"my-phone\.yaml.*not valid YAML"):
        load_profile(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ProfileError, match=r"list\.yaml: a profile must be a YAML mapping"):
        load_profile(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_profiles_table_lists_every_profile():
    table = profiles_table()
    for name in SHIPPED:
        assert f"\n{name} " in table
    host_row = next(line for line in table.splitlines() if line.startswith("host "))
    assert host_row.split().count("measured") == 3  # RAM, bandwidth, compute
    assert "68.3" in next(line for line in table.splitlines() if line.startswith("pixel8 "))


def test_other_runtimes_are_optional_sourced_and_checked(tmp_path):
    pixel8 = load_profile("pixel8")
    assert pixel8.runtimes() == [("executorch", "xnnpack"), ("onnxruntime", "cpu")]
    assert pixel8.precisions() == ("fp32", "8da4w", "int8", "int4")
    assert [pixel8.runtime_for(p) for p in pixel8.precisions()] == \
        ["executorch", "executorch", "onnxruntime", "onnxruntime"]
    alone = pixel8.running("onnxruntime")
    assert (alone.runtime, alone.backend, alone.also_runs) == ("onnxruntime", "cpu", ())
    assert alone.precisions() == ("fp32", "int8", "int4")
    # every phone that names ExecuTorch also lists onnxruntime-genai, with a source
    for profile in list_profiles():
        if profile.tier == "phone":
            assert [o.runtime for o in profile.also_runs] == ["onnxruntime"], profile.name
            assert "onnxruntime-genai" in profile.also_runs[0].source
        else:
            assert profile.also_runs == (), profile.name
    with pytest.raises(ValueError, match=r"laptop-x86 runs onnxruntime, which ships fp32, int8, "
                                         r"int4; not 8da4w"):
        load_profile("laptop-x86").runtime_for("8da4w")

    raw = pixel8_raw()
    del raw["also_runs"]
    assert load_profile(write(tmp_path, raw)).precisions() == ("fp32", "8da4w")
    cases = [
        ([{"runtime": "tflite", "backend": "cpu", "source": "x"}],
         r"also_runs tflite/cpu is not supported by the latency model"),
        ([{"runtime": "executorch", "backend": "xnnpack", "source": "x"}],
         r"name a runtime twice"),
        ([{"runtime": "onnxruntime", "backend": "cpu"}], r"missing field also_runs\[0\]\.source"),
        ({"runtime": "onnxruntime"}, r"also_runs must be a list"),
    ]
    for also_runs, message in cases:
        raw["also_runs"] = also_runs
        with pytest.raises(ProfileError, match=rf"my-phone\.yaml: .*{message}"):
            load_profile(write(tmp_path, raw))
