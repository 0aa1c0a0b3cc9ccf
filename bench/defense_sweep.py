"""A defense settings sweep: the defense table's runner (qnn.defense_grid) on a grid file of your own.

    python bench/defense_sweep.py --grid my_grid.yaml --budget cpu --seeds 0,1,2 --out results/screens/my_grid

The grid format, resume, provenance and report are the table's (bench/defense_table.py, qnn/defense_grid.py); the
grids of earlier screens are kept with their results in results/archive/sweeps/ (they ran under the earlier,
40-iteration evaluation, so a re-run scores them under today's protocol instead).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    from qnn.defense_grid import main as grid_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--grid" or a.startswith("--grid=") for a in argv) and not {"-h", "--help"} & set(argv):
        print("defense_sweep: error: --grid is required (a YAML list of rows; see qnn/defense_grid.py)", file=sys.stderr)
        return 2
    return grid_main(argv, prog="defense_sweep")


if __name__ == "__main__":
    sys.exit(main())
