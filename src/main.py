"""The seed's entry point: `python src/main.py --image-path DIR [flags]` is `vlmtag tag`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vlmtag.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli(["tag", *sys.argv[1:]], prog_name="python src/main.py")
