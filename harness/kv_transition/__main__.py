"""`python -m kv_transition` delegates to the same CLI as `kvt`, exit codes propagated."""

import sys

from kv_transition.cli import main

if __name__ == "__main__":
    sys.exit(main())
