import pytest

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.vllm_adapter.options import DaopOptions


def test_defaults_are_auto_exact():
    options = DaopOptions.parse(None)
    assert options.budget_key is None and options.mode == "exact" and options.profile is None


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"resident_experts": 3}, "resident_experts"),
        ({"resident_fraction": 0.25}, "resident_fraction"),
        ({"resident_fraction": 1}, "resident_fraction"),
        ({"expert_memory_gib": 1.5}, "expert_memory_gib"),
        ('{"resident_fraction": 0.5}', "resident_fraction"),
    ],
)
def test_one_budget_key_is_taken(raw, key):
    options = DaopOptions.parse(raw)
    assert options.budget_key == key


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"resident_experts": 2, "resident_fraction": 0.5}, ["'resident_experts' and 'resident_fraction'", "at most one"]),
        ({"cache_ratio": 0.5}, ["unknown daop option 'cache_ratio'", "resident_fraction"]),
        ({"resident_fraction": 1.5}, ["'resident_fraction'", "[0, 1]", "1.5"]),
        ({"resident_fraction": "half"}, ["'resident_fraction'", "'half'"]),
        ({"resident_experts": -1}, ["'resident_experts'", "-1"]),
        ({"resident_experts": 2.0}, ["'resident_experts'", "integer"]),
        ({"resident_experts": True}, ["'resident_experts'", "True"]),
        ({"expert_memory_gib": -2}, ["'expert_memory_gib'", ">= 0"]),
        ({"mode": "fast"}, ["'mode'", '"exact", "verified", "daop"']),
        ({"degrade": True}, ["'degrade'", '"verified" or "daop" only', '"exact"']),
        ({"mode": "exact", "first_predicted_layer": 2}, ["'first_predicted_layer'", '"exact"']),
        ({"mode": "daop", "first_predicted_layer": 0}, ["'first_predicted_layer'", "1 <= i <= L-1", "0"]),
        ({"mode": "daop", "degrade": "yes"}, ["'degrade'", "true or false"]),
        ({"staleness_tolerance": 0.1}, ["'staleness_tolerance'", '"verified" or "daop" only', '"exact"']),
        ({"mode": "verified", "staleness_tolerance": -0.1}, ["'staleness_tolerance'", ">= 0", "-0.1"]),
        ({"mode": "daop", "staleness_tolerance": "tight"}, ["'staleness_tolerance'", "cosine", "'tight'"]),
        ({"cpu_threads": 0}, ["'cpu_threads'", ">= 1"]),
        ({"stream": "sometimes"}, ["'stream'", '"auto", "off", "all"', "'sometimes'"]),
        ({"staging_slots": 0}, ["'staging_slots'", ">= 1"]),
        ({"stream": "off", "staging_slots": 2}, ["'staging_slots'", 'stream "auto" or "all" only', '"off"']),
        ({"realloc": "lru"}, ["'realloc'", '"auto", "paper", "off"']),
        ({"swap_threshold": 2}, ["'swap_threshold'", "realloc 'paper' only", "'auto'"]),
        ({"realloc": "paper", "hardware": "a6000"}, ["'hardware'", "realloc 'auto' only"]),
        ({"realloc": "off", "max_swap_bytes_per_step": 5}, ["'max_swap_bytes_per_step'", "'paper' or 'auto'"]),
        ({"max_swap_bytes_per_step": -1}, ["'max_swap_bytes_per_step'", ">= 0"]),
        ({"hardware": "tpu-v9"}, ["'hardware'", "a6000, h200, local", "pcie_gbps", "'tpu-v9'"]),
        ({"profile": 3}, ["'profile'", "path"]),
        ("resident_fraction=0.5", ["not valid JSON", "JSON object"]),
        ("[1, 2]", ["must be a JSON object", "list"]),
    ],
)
def test_wrong_input_names_key_and_accepted_values(raw, words):
    with pytest.raises(DaopConfigError) as info:
        DaopOptions.parse(raw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_resident_experts_above_model_experts():
    options = DaopOptions.parse({"resident_experts": 9})
    with pytest.raises(DaopConfigError, match=r"0 <= n <= 8.*got 9"):
        options.check_model(num_layers=4, num_experts=8)
    DaopOptions.parse({"resident_experts": 8}).check_model(num_layers=4, num_experts=8)


def test_device_expert_format_is_checked_against_the_shape():
    with pytest.raises(DaopConfigError, match=r"int4 experts \(daop option 'device_expert_format'\).*got 64"):
        DaopOptions.parse({"device_expert_format": "int4"}).check_model(4, 8, (64, 128))
    with pytest.raises(DaopConfigError, match=r"'device_expert_format' must be one of .*got 'int2'"):
        DaopOptions.parse({"device_expert_format": "int2"})
    DaopOptions.parse({"expert_format": "int4", "device_expert_format": "int8"}).check_model(4, 8, (128, 256))


def test_first_predicted_layer_must_leave_a_layer_before_it():
    with pytest.raises(DaopConfigError, match=r"1 <= i <= 3 .*4 MoE layers.*got 4"):
        DaopOptions.parse({"mode": "daop", "first_predicted_layer": 4}).check_model(num_layers=4, num_experts=8)
    with pytest.raises(DaopConfigError, match=r"1 MoE layer; use mode \"exact\""):
        DaopOptions.parse({"mode": "verified"}).check_model(num_layers=1, num_experts=8)
    DaopOptions.parse({"mode": "daop", "first_predicted_layer": 3}).check_model(num_layers=4, num_experts=8)


def test_fidelity_defaults_follow_the_mode():
    daop = DaopOptions.parse({"mode": "daop"}).fidelity
    verified = DaopOptions.parse({"mode": "verified"}).fidelity
    assert daop.degrades and not verified.degrades
    assert not DaopOptions.parse({"mode": "daop", "degrade": False}).fidelity.degrades
    # the paper's 4, or the last layer of a shallower model
    assert daop.first_layer(32) == 4 and daop.first_layer(4) == 3
    assert DaopOptions.parse({"mode": "daop", "first_predicted_layer": 1}).fidelity.first_layer(32) == 1
    assert daop.staleness_tolerance is None  # no gate unless asked
    assert DaopOptions.parse({"mode": "verified", "staleness_tolerance": 0}).fidelity.staleness_tolerance == 0


def test_realloc_defaults_to_auto_with_a_hardware_file(tmp_path):
    options = DaopOptions.parse({})
    assert (options.realloc, options.hardware) == ("auto", "auto")
    good = tmp_path / "box.json"
    good.write_text('{"pcie_gbps": 12, "device_gbps": 900, "cpu_gbps": 30}')
    assert DaopOptions.parse({"hardware": str(good)}).hardware == str(good)
    bad = tmp_path / "bad.json"
    bad.write_text('{"pcie_gbps": 0, "device_gbps": 900, "cpu_gbps": 30}')
    with pytest.raises(DaopConfigError, match="bad.json is not .*must be numbers > 0"):
        DaopOptions.parse({"hardware": str(bad)})
