"""The one place that knows how the installed transformers release spells what we lean on.

transformers 5.24 renamed the KV-cache argument of every model, layer, mask function and
output from `past_key_values` to `cache` (the old name still works there, with a
FutureWarning, until 5.40). Code that names the argument goes through `CACHE_ARG`, so it
calls each release by its own spelling and never triggers the deprecation path; code that
receives it (our model's `forward`) takes both names through `pop_cache`.
"""

from __future__ import annotations

import inspect

from transformers import masking_utils

# Read off the library itself rather than its version number: a backport or a later revert
# of the rename is then followed too.
CACHE_ARG: str = "cache" if "cache" in inspect.signature(masking_utils.create_causal_mask).parameters \
    else "past_key_values"
CACHE_ARG_NAMES = ("cache", "past_key_values")


def cache_kwargs(cache) -> dict:
    """`{CACHE_ARG: cache}`: pass with `**` to any transformers call that takes the cache."""
    return {CACHE_ARG: cache}


def pop_cache(kwargs: dict, cache=None):
    """The cache a caller passed under either name (removed from `kwargs`); `cache` is the
    value already bound to a named parameter, if any. Both set at once is refused, as
    transformers refuses it."""
    for name in CACHE_ARG_NAMES:
        value = kwargs.pop(name, None)
        if value is not None:
            if cache is not None and value is not cache:
                raise ValueError(f"pass the KV cache once, as `{CACHE_ARG}` (got both `cache` and `past_key_values`)")
            cache = value
    return cache
