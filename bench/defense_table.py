"""The defense table: QADT-R against per-bit PBAT (and the other baselines) at equal compute, over seeds, under a named
evaluation protocol; every cell (row, seed, bit-width, patch configuration, attack) written as it finishes.

    python bench/defense_table.py --budget cpu --seeds 0,1,2 --out results/defense_equal_compute --plan
    python bench/defense_table.py --budget cpu --seeds 0,1,2 --out results/defense_equal_compute
    python bench/defense_table.py --budget cpu --protocol full --rows none,qadtr --bits 4 --configs '10x10 sq' \\
        --out results/defense_equal_compute_witness     # the saturation witness
    python bench/defense_table.py --budget smoke       # a minute: small CNN, synthetic data

The rows are qnn/configs/grid_defense_equal_compute.yaml (--grid for another); the runner is qnn.defense_grid, the
protocols qnn.evaluation. A re-run resumes: finished cells are kept, trained models reused. The markdown, plot and
statistics come from the JSON: `python bench/render_docs.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from qnn.defense_grid import main as grid_main

    return grid_main(argv, prog="defense_table")


if __name__ == "__main__":
    sys.exit(main())
