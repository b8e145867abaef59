"""`python -m dynamic_llava.serving MODEL ...`: the same as `dynamic-llava serve MODEL ...`."""

import sys

from . import main

sys.exit(main())
