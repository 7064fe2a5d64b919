"""``python -m token_dispatcher.train RECIPE ...``, also under ``torchrun ... -m``."""
import sys

# Imported through the package (not run as a script), so the ranks mp.spawn starts find
# launch._spawned by its module name.
from .launch import main

if __name__ == "__main__":
    sys.exit(main())
