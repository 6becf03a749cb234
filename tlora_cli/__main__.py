"""`python -m tlora_cli`, and the `tlora` command (pyproject's entry point is this module's `main`).

The CLI's modules take seconds to load (torch, transformers): Ctrl-C then ends the run as it would later, with
one line and exit code 130, never a KeyboardInterrupt traceback.
"""

import sys

try:
    from .cli import main
except KeyboardInterrupt:
    sys.stderr.write("interrupted: nothing was written\n")
    sys.exit(130)

if __name__ == "__main__":
    main()
