"""The seed's benchmark entry: `python src/benchmark.py --image-path DIR --count N --model M`.

The same as `vlmtag bench` with the same flags.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vlmtag.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli(["bench", *sys.argv[1:]], prog_name="python src/benchmark.py")
