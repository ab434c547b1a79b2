"""``python -m teisup.embedded``: the embedded TEI backend (TEI's router flags)."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
