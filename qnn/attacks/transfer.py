"""Transfer matrices: patches crafted on a source (float, a bit-width, or another checkpoint), ASR on every target."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from qnn.attacks.patch import PatchConfig, evaluate_patch, optimize_universal_patch, save_patch
from qnn.layers import precision


def transfer_matrix(model: nn.Module, x_att: torch.Tensor, y_att: torch.Tensor, x_eval: torch.Tensor,
                    y_eval: torch.Tensor, cfg: PatchConfig, sources: list[int], targets: list[int],
                    patch_dir: str | Path | None = None, progress: bool = False,
                    source_models: dict[str, nn.Module] | None = None, device: str = "cpu") -> dict:
    """ASR (%) of a patch crafted at each source bit-width (or named source model) on each target bit-width."""
    rows: dict[str, dict] = {}
    srcs: list[tuple[str, nn.Module, int]] = [(str(b), model, b) for b in sources]
    for name, m in (source_models or {}).items():
        srcs.append((name, m, 32))
    for name, src_model, b in srcs:
        with precision(src_model, b):
            patch, info = optimize_universal_patch(src_model, x_att, y_att, cfg, progress=progress, device=device)
        if patch_dir is not None:
            save_patch(Path(patch_dir) / f"patch_src{name}", patch, cfg, info)
        row = {}
        for t in targets:
            with precision(model, t):
                row[str(t)] = evaluate_patch(model, x_eval, y_eval, patch, cfg, device=device)
        rows[name] = {"targets": row, "craft": info}
        print(f"source {name}: " + " ".join(f"{t}b ASR {r['asr_pct']:.1f}%" for t, r in row.items()), flush=True)
    return {"sources": [s[0] for s in srcs], "targets": [str(t) for t in targets], "rows": rows, "patch": cfg.to_dict()}


def heatmap_png(matrix: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    srcs, tgts = matrix["sources"], matrix["targets"]
    a = np.array([[matrix["rows"][s]["targets"][t]["asr_pct"] for t in tgts] for s in srcs])
    fig, ax = plt.subplots(figsize=(1.2 * len(tgts) + 1.5, 0.9 * len(srcs) + 1.2))
    im = ax.imshow(a, vmin=0, vmax=100, cmap="magma")
    ax.set_xticks(range(len(tgts)), [f"{t}b" for t in tgts])
    ax.set_yticks(range(len(srcs)), [f"{s}b" if s.isdigit() else s for s in srcs])
    ax.set_xlabel("target bit-width")
    ax.set_ylabel("patch crafted on")
    for i in range(len(srcs)):
        for j in range(len(tgts)):
            ax.text(j, i, f"{a[i, j]:.1f}", ha="center", va="center", color="white" if a[i, j] < 60 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="ASR %")
    ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
