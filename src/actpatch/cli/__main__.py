"""``python -m actpatch.cli ...`` (and ``torchrun ... -m actpatch.cli ioi``): the ``actpatch`` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
