"""`python -m mom.train` (and `deepspeed --module mom.train`): the `mom-train` command."""

from mom.train.loop import main

main()
