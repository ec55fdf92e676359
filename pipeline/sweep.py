"""python -m pipeline.sweep SWEEP.toml: the sweep command (pipeline.sweep_cli), under the name users type.

The runner it drives is pipeline.runner; this module only starts the command, so nothing imports it.
"""

import sys

from pipeline.sweep_cli import main

if __name__ == "__main__":
    sys.exit(main())
