"""`python -m llava_fitprune.cli SUBCOMMAND ...`: the same as the `llava-fitprune` command."""
import sys

from . import main

sys.exit(main())
