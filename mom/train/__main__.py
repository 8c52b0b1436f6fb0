"""`python -m mom.train` (and `deepspeed --module mom.train`): the `mom-train` command, `mom.cli.train`."""

import sys

from mom.cli.train import main

sys.exit(main())
