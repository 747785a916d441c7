"""`python -m grm_engine` is the `grm-engine` command."""
import sys

from .cli import main

sys.exit(main())
