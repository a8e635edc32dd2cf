"""``python -m ppl_vae`` is the ``ppl-vae`` command."""

import sys

from .cli import main

sys.exit(main())
