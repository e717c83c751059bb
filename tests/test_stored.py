"""The benchmark results the chapters display come with the package."""

import pytest

from rl4llm.stored import benchmark_result


@pytest.mark.parametrize("name", ["gae", "token_logprobs"])
def test_the_chapters_results_are_package_data(name):
    result = benchmark_result(name)
    assert result["device_type"] == "cpu" and result["rows"]


def test_an_unknown_result_names_what_is_stored():
    with pytest.raises(ValueError, match="gae-cpu.json"):
        benchmark_result("nonexistent")
    with pytest.raises(TypeError):
        benchmark_result(3)
