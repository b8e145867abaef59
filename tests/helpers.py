"""Test helpers: the cache of a generate() result, and stock LLaVA on the same weights."""

from dynamic_llava.sparse_cache import cache_from_output as cache_of  # noqa: F401
from dynamic_llava.tools.stock import stock_llava  # noqa: F401
