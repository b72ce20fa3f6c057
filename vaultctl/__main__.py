"""``python -m vaultctl``: the same as the ``vaultctl`` console script."""
import sys

from vaultctl.cli import main

sys.exit(main())
