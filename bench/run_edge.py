#!/usr/bin/env python3
"""`python bench/run_edge.py --bundle B ...` from a checkout: runs the edge runner, `export/run_edge.py`.

The runner is one standalone file (standard library, numpy and onnxruntime; Python 3.9+) and every bundle carries a
copy of it, so on a device run `python3 B/run_edge.py --bundle B`. This launcher imports the standard library only.
"""

import os
import runpy
import sys

RUNNER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "export", "run_edge.py")

if __name__ == "__main__":
    if not os.path.isfile(RUNNER):
        sys.exit(f"run_edge: error: {RUNNER} not found; on a device run the bundle's own copy: "
                 "python3 BUNDLE/run_edge.py --bundle BUNDLE")
    sys.argv[0] = RUNNER
    runpy.run_path(RUNNER, run_name="__main__")
