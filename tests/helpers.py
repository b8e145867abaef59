"""Test helpers: the cache of a generate() result, and stock LLaVA on the same weights."""


def cache_of(generate_output):
    """The cache returned by `generate(..., return_dict_in_generate=True)` (`cache` in 5.x, `past_key_values` 4.x)."""
    for key in ("cache", "past_key_values"):
        if key in generate_output and generate_output[key] is not None:
            return generate_output[key]
    raise AssertionError("generate() returned no cache")


from dynamic_llava.tools.stock import stock_llava  # noqa: E402,F401  (re-exported for the tests)
