"""``python -m zhome`` is the ``zhome`` command."""

import sys

from zhome.cli import main

sys.exit(main())
