"""Entrypoint for `ray job submit -- python jobs/study.py --config <yaml> [key=value ...]`.

Thin by design: parses arguments and calls `synthaug study` (see synthaug/cli.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working dir, when not installed

from synthaug.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["study", *sys.argv[1:]])
