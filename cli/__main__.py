"""`python -m dynamic_llava.cli ...`: the same as `dynamic-llava ...` (e.g. under `accelerate launch -m`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
