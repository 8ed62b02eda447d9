"""``python -m imgclf.cli``: the same as the ``imgclf`` command."""

import sys

from . import main

sys.exit(main())
