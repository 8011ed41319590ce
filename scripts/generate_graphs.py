"""Render every figure into results/graphs from the result files under results/ (same as `pymoe graphs`)."""

import sys

from pymoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["graphs", *sys.argv[1:]]))
