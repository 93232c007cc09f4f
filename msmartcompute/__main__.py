"""`python -m msmartcompute ...` is the `msmartcompute` command."""
import sys

from .cli import main

sys.exit(main())
