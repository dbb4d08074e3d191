"""`python -m reasonknee3d ...` (so `torchrun -m reasonknee3d train ...` works)."""
import sys

from .cli import main

sys.exit(main())
