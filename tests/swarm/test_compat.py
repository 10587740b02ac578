"""swarm.compat: the cache argument under the name the installed transformers uses."""

from __future__ import annotations

import inspect

import pytest
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from swarm.compat import CACHE_ARG, cache_kwargs, pop_cache

pytestmark = pytest.mark.compat


def test_the_name_is_the_one_the_installed_models_take():
    for forward in (LlamaForCausalLM.forward, LlamaDecoderLayer.forward):
        assert CACHE_ARG in inspect.signature(forward).parameters
    assert cache_kwargs("c") == {CACHE_ARG: "c"}


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_either_name_is_taken_and_removed(name):
    kwargs = {name: "c", "other": 1}
    assert pop_cache(kwargs) == "c"
    assert kwargs == {"other": 1}
    assert pop_cache({name: "c"}, cache="c") == "c"  # the same object under both is no conflict


def test_two_different_caches_are_refused():
    with pytest.raises(ValueError, match="pass the KV cache once"):
        pop_cache({"past_key_values": "a"}, cache="b")
    assert pop_cache({}) is None
