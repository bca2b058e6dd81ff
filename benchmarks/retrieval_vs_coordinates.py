"""Index answers versus coordinate text, on this project's own code (issue 6; see perceive/compare.py).

    python benchmarks/retrieval_vs_coordinates.py --out runs/compare [--steps 800] [--eval-scenes 60]

Trains both models for the same steps on the same scenes (resumable), evaluates them on held-out
crowded scenes bucketed by answer size, times decoding of 1/5/20/50-object answers at batch 1 and 16,
prints the tables and writes comparison.json and comparison.png.
"""

import sys

from perceive.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
