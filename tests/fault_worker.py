"""pstar's worker process with the faults of tests/faults.py installed (a test-only entry point)."""

import sys

from tests.faults import install_from_env

if __name__ == "__main__":
    install_from_env()
    from pstar_cli.launch.worker import main

    sys.exit(main())
