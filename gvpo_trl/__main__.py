"""``python -m gvpo_trl`` (and ``accelerate launch -m gvpo_trl``): the ``gvpo-trl`` command line."""

import sys

from .cli import main

sys.exit(main())
