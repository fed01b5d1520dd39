"""`python -m jaxattn ...` runs the `jaxattn` command (see jaxattn/cli.py)."""

import sys

from jaxattn.cli import main

sys.exit(main())
