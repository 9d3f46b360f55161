"""``python -m rexnet_train``: the same as the ``rexnet-train`` console script."""
import sys

from rexnet_train.cli import main

sys.exit(main())
