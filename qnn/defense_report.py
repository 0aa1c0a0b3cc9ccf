"""The defense table's statistics, from a defense-grid results file (`qnn.defense_grid`): the protocol's ASR (the
maximum over its attacks) per row, seed, bit-width and configuration; the unseen ASR (mean over the unseen
configurations); QADT-R minus per-bit PBAT at equal compute per bit-width, with a paired t interval over seeds and a
bootstrap interval over the scored images pooled across seeds; and the spread between attacks (masking)."""

from __future__ import annotations

import math

import numpy as np

#: (QADT-R row, per-bit PBAT row) pairs of equal training compute
EQUAL_COMPUTE = (("qadtr", "pbat at qadtr's compute"), ("qadtr at pbat's compute", "pbat"))
UNSEEN = ("10x10 sq", "6.25% circ")
MASKING_POINTS = 5.0
#: two-sided 95% Student t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _scores(cell: dict) -> np.ndarray:
    from qnn.evaluation import decode_scores

    return decode_scores(cell["scores"])


def member_asr(fooled: np.ndarray, placements: int, idx: np.ndarray | None = None) -> float:
    f = fooled if idx is None else fooled[idx]
    ok = f >= 0
    return 100.0 * float(f[ok].sum()) / (placements * max(int(ok.sum()), 1))


class Table:
    """The results file, indexed."""

    def __init__(self, results: dict):
        self.res = results
        self.placements = results["protocol"]["placements"]
        self.members = [m["name"] for m in results["protocol"]["members"]]
        self.by: dict = {}
        for c in results["cells"].values():
            self.by.setdefault((c["row"], c["seed"], c["bits"], c["config"]), {})[c["attack"]] = c
        self.rows = list(dict.fromkeys(r["name"] for r in results["grid"]))
        self.seeds = sorted({k[1] for k in self.by})

    def complete(self, row: str, seed: int, bits: int, config: str) -> dict | None:
        """The cells of every attack the protocol runs on that model (the EOT member only on multi-precision
        models), or None while some are missing."""
        got = self.by.get((row, seed, bits, config))
        if not got:
            return None
        multi = len(next(iter(got.values()))["trained_bits"]) > 1 or next(iter(got.values()))["row_definition"]["deploy"]
        need = [m for m in self.members if multi or "EOT" not in m]
        return got if all(m in got for m in need) else None

    def asr(self, row: str, seed: int, bits: int, config: str, idx: np.ndarray | None = None) -> tuple[float, dict] | None:
        """(the protocol's ASR: the maximum over its attacks, {attack: ASR}) on images `idx` (all: None)."""
        got = self.complete(row, seed, bits, config)
        if got is None:
            return None
        per = {m: member_asr(_scores(c), self.placements, idx) for m, c in got.items()}
        return max(per.values()), per

    def unseen(self, row: str, seed: int, bits: int, idx: np.ndarray | None = None) -> float | None:
        vals = [self.asr(row, seed, bits, c, idx) for c in UNSEEN]
        return None if any(v is None for v in vals) else sum(v[0] for v in vals) / len(vals)

    def clean(self, row: str, seed: int, bits: int) -> float | None:
        got = self.by.get((row, seed, bits, UNSEEN[0]))
        return next(iter(got.values()))["clean_acc_pct"] if got else None

    def compute(self, row: str, seed: int) -> float | None:
        """The row's total training compute in plain-QAT epochs (per-bit rows: the sum of their models)."""
        per_model = {}
        for (r, s, b, _), got in self.by.items():
            if r == row and s == seed:
                c = next(iter(got.values()))
                per_model[str(c["trained_bits"])] = c["compute_qat_epochs"]
        return sum(per_model.values()) if per_model else None

    def n_scored(self) -> int:
        c = next(iter(self.res["cells"].values()))
        return len(c["scores"])


def hours_by_seed(results: dict) -> dict[str, dict]:
    """Hours of the machine spent per seed, from the cells: training (once per model), crafting (once per crafted
    patch: an EOT patch scores several cells) and scoring, with how many models and cells recorded their time
    (cells written before `score_seconds` and `train_seconds` were recorded have the crafting time only)."""
    out: dict[str, dict] = {}
    models: dict = {}
    crafts: dict = {}
    for c in results["cells"].values():
        o = out.setdefault(str(c["seed"]), {"train_h": 0.0, "craft_h": 0.0, "score_h": 0.0, "models": 0,
                                            "models_timed": 0, "cells": 0, "cells_timed": 0})
        o["cells"] += 1
        if c.get("score_seconds") is not None:
            o["cells_timed"] += 1
            o["score_h"] += c["score_seconds"] / 3600
        models[(str(c["seed"]), c["checkpoint_sha256"])] = c.get("train_seconds")
        # an EOT patch ('EOT') scores several cells with one crafting; its time tells a crafting apart from another of
        # the same cells' patch (one re-crafted after a restart for its left-out bit-widths)
        crafts[(str(c["seed"]), c["row"], c["config"], c["attack"], str(c.get("crafted_at")), c["checkpoint_sha256"],
                c["seconds"])] = c["seconds"]
    for (seed, _), secs in models.items():
        out[seed]["models"] += 1
        if secs is not None:
            out[seed]["models_timed"] += 1
            out[seed]["train_h"] += secs / 3600
    for (seed, *_), secs in crafts.items():
        out[seed]["craft_h"] += secs / 3600
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def paired_t(diffs: list[float]) -> tuple[float, float] | None:
    """95% t interval of the mean of paired differences (None below two pairs)."""
    n = len(diffs)
    if n < 2:
        return None
    m, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    h = T975.get(n - 1, 1.96) * sd / math.sqrt(n)
    return m - h, m + h


def bootstrap(t: Table, a: str, b: str, bits: int, seeds: list[int], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean_seeds(unseen ASR of a - of b), resampling the scored images (the same
    resample for both rows and every attack, so that the maximum over attacks is taken on each resample)."""
    rng = np.random.default_rng(seed)
    n = t.n_scored()
    vals = []
    for _ in range(n_boot):
        d = []
        for s in seeds:
            idx = rng.integers(0, n, n)
            d.append(t.unseen(a, s, bits, idx) - t.unseen(b, s, bits, idx))
        vals.append(float(np.mean(d)))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def summarize(results: dict, n_boot: int = 1000) -> dict:
    t = Table(results)
    bits_all = sorted({k[2] for k in t.by}, key=lambda b: (b != 32, -b))
    rows = {}
    for r in t.rows:
        per_bits = {}
        for b in bits_all:
            seeds = [s for s in t.seeds if t.unseen(r, s, b) is not None]
            if not seeds:
                continue
            per_bits[str(b)] = {
                "seeds": seeds, "unseen_asr_pct": float(np.mean([t.unseen(r, s, b) for s in seeds])),
                "unseen_asr_pct_by_seed": {str(s): t.unseen(r, s, b) for s in seeds},
                "clean_acc_pct": float(np.mean([t.clean(r, s, b) for s in seeds])),
                "per_config": {c: {str(s): t.asr(r, s, b, c) for s in seeds if t.asr(r, s, b, c)} for c in UNSEEN},
            }
        left = {}
        for b in results["budget"]["left_out"]:
            v = [t.asr(r, s, b, "10x10 sq") for s in t.seeds]
            v = [x[0] for x in v if x]
            if v:
                left[str(b)] = float(np.mean(v))
        seen = {}
        for b in bits_all:
            v = [t.asr(r, s, b, "6x6 sq (seen)") for s in t.seeds]
            v = [x[0] for x in v if x]
            if v:
                seen[str(b)] = float(np.mean(v))
        comp = [t.compute(r, s) for s in t.seeds if t.compute(r, s) is not None]
        if per_bits or left or seen:
            rows[r] = {"per_bits": per_bits, "left_out_10x10_asr_pct": left, "seen_6x6_asr_pct": seen,
                       "compute_qat_epochs": float(np.mean(comp)) if comp else None}
    comparisons = []
    for a, b in EQUAL_COMPUTE:
        for bits in bits_all:
            seeds = [s for s in t.seeds if t.unseen(a, s, bits) is not None and t.unseen(b, s, bits) is not None]
            if not seeds:
                continue
            diffs = [t.unseen(a, s, bits) - t.unseen(b, s, bits) for s in seeds]
            comparisons.append({"qadtr_row": a, "pbat_row": b, "bits": bits, "seeds": seeds, "diff_by_seed": diffs,
                                "mean_diff": float(np.mean(diffs)), "t95": paired_t(diffs),
                                "bootstrap95": bootstrap(t, a, b, bits, seeds, n_boot)})
    masking = []
    for (r, s, b, c), got in sorted(t.by.items(), key=lambda kv: str(kv[0])):
        v = t.asr(r, s, b, c)
        if v is None:
            continue
        per = v[1]
        hi, lo = max(per, key=per.get), min(per, key=per.get)
        if per[hi] - per[lo] > MASKING_POINTS:
            masking.append({"row": r, "seed": s, "bits": b, "config": c, "strong": hi, "weak": lo,
                            "strong_asr_pct": per[hi], "weak_asr_pct": per[lo]})
    return {"rows": rows, "comparisons": comparisons, "masking": masking, "seeds": t.seeds, "bits": bits_all,
            "hours_by_seed": hours_by_seed(results),
            "n_scored": t.n_scored(), "placements": t.placements, "members": t.members}


def verdict(c: dict) -> str:
    """One comparison in words: below, above, or not separable from zero (by both intervals)."""
    lo_t, hi_t = c["t95"] if c["t95"] else (None, None)
    lo_b, hi_b = c["bootstrap95"]
    if hi_b < 0 and (hi_t is None or hi_t < 0):
        return "QADT-R lower (better)"
    if lo_b > 0 and (lo_t is None or lo_t > 0):
        return "QADT-R higher (worse)"
    return "no difference shown"


def fmt_interval(iv) -> str:
    return "-" if iv is None else f"[{iv[0]:+.1f}, {iv[1]:+.1f}]"


def markdown(s: dict, results: dict, command: str) -> str:
    from qnn.outputs import markdown_table

    proto = results["protocol"]
    members = ", ".join(f"`{m['name']}` at {m['iterations']} iterations" for m in proto["members"])
    lines = [f"Defense table, budget `{results['budget']['name']}`, protocol `{proto['name']}` ({members}; crafted on "
             f"the first {proto['n_craft']} training images, batch {proto['batch_size']}; scored on the last "
             f"{proto['n_score']} test images at {proto['placements']} random positions each; ASR = the maximum over "
             f"the attacks). Seeds {', '.join(map(str, s['seeds']))}. Unseen ASR = mean of "
             f"{' and '.join(UNSEEN)}. Command: `{command}`\n"]
    comp = [[c["bits"], f"{c['qadtr_row']} - {c['pbat_row']}", len(c["seeds"]),
             " / ".join(f"{d:+.1f}" for d in c["diff_by_seed"]), f"{c['mean_diff']:+.1f}", fmt_interval(c["t95"]),
             fmt_interval(c["bootstrap95"]), verdict(c)] for c in s["comparisons"]]
    if comp:
        lines.append("QADT-R minus per-bit PBAT at equal training compute, unseen ASR points (negative: QADT-R more "
                     "robust); paired 95% t interval over seeds, 95% bootstrap interval over the scored images pooled "
                     "across seeds:\n")
        lines.append(markdown_table(["bits", "pair", "seeds", "per seed", "mean", "t 95%", "bootstrap 95%", "verdict"],
                                    comp))
    names = list(s["rows"])
    head = ["bits"] + names
    body = []
    for b in s["bits"]:
        cells = []
        for n in names:
            r = s["rows"][n]["per_bits"].get(str(b))
            cells.append(f"{r['clean_acc_pct']:.1f} / {r['unseen_asr_pct']:.1f}" if r else "-")
        if any(c != "-" for c in cells):
            body.append([b] + cells)
    body.append(["compute (QAT epochs)"] + [f"{s['rows'][n]['compute_qat_epochs']:.2f}"
                                             if s["rows"][n]["compute_qat_epochs"] else "-" for n in names])
    lines.append("\nClean accuracy % / unseen ASR %, mean over the seeds each row has:\n")
    lines.append(markdown_table(head, body))
    extra = [[n, *(f"{s['rows'][n]['left_out_10x10_asr_pct'].get(str(b), float('nan')):.1f}"
                   if str(b) in s["rows"][n]["left_out_10x10_asr_pct"] else "-" for b in results["budget"]["left_out"]),
              *(f"{s['rows'][n]['seen_6x6_asr_pct'][str(b)]:.1f}" if str(b) in s["rows"][n]["seen_6x6_asr_pct"] else "-"
                for b in results["budget"]["eval_bits"])] for n in names]
    lines.append("\n10x10 ASR % at the left-out bit-widths (BatchNorm re-calibrated) and seen 6x6 ASR % (seed 0):\n")
    lines.append(markdown_table(["row"] + [f"{b} bits left out" for b in results["budget"]["left_out"]]
                                + [f"seen {b}b" for b in results["budget"]["eval_bits"]], extra))
    per = []
    t = Table(results)
    for n in names:
        for b in s["bits"]:
            for c in UNSEEN + ("6x6 sq (seen)",):
                v = [t.asr(n, sd, b, c) for sd in t.seeds]
                v = [x for x in v if x]
                if not v:
                    continue
                per.append([n, b, c] + [f"{np.mean([x[1][m] for x in v if m in x[1]]):.1f}"
                                        if any(m in x[1] for x in v) else "-" for m in s["members"]]
                           + [f"{np.mean([x[0] for x in v]):.1f}"])
    lines.append("\nEvery attack's ASR %, mean over seeds:\n")
    lines.append(markdown_table(["row", "bits", "config"] + s["members"] + ["max"], per))
    if s["masking"]:
        lines.append(f"\nWhere one attack reads a model more than {MASKING_POINTS:g} points more robust than another "
                     "(a sign of gradient masking against the weaker attack):\n")
        lines.append(markdown_table(["row", "seed", "bits", "config", "strong attack", "ASR %", "weak attack", "ASR %"],
                                    [[m["row"], m["seed"], m["bits"], m["config"], m["strong"], m["strong_asr_pct"],
                                      m["weak"], m["weak_asr_pct"]] for m in s["masking"]]))
    lines.append("\nHours of the machine spent, per seed (training + crafting + scoring; models and cells that "
                 "recorded their time):\n")
    lines.append(markdown_table(["seed", "training h", "crafting h", "scoring h", "models timed", "cells timed"],
                                [[sd, f"{h['train_h']:.2f}", f"{h['craft_h']:.2f}", f"{h['score_h']:.2f}",
                                  f"{h['models_timed']} of {h['models']}", f"{h['cells_timed']} of {h['cells']}"]
                                 for sd, h in s["hours_by_seed"].items()]))
    return "\n".join(lines)


def plot(s: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in s["rows"] if s["rows"][n]["per_bits"]]
    bits = [b for b in s["bits"] if any(str(b) in s["rows"][n]["per_bits"] for n in names)]
    fig, ax = plt.subplots(figsize=(1.4 * len(bits) * max(1, len(names)) / 2 + 3, 3.8))
    w = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        pb = s["rows"][n]["per_bits"]
        mean = [pb[str(b)]["unseen_asr_pct"] if str(b) in pb else np.nan for b in bits]
        by_seed = [list(pb[str(b)]["unseen_asr_pct_by_seed"].values()) if str(b) in pb else [np.nan] for b in bits]
        err = [(np.max(v) - np.min(v)) / 2 if len(v) > 1 else 0 for v in by_seed]
        ax.bar(np.arange(len(bits)) + i * w, mean, w, yerr=err, label=n, capsize=2)
    ax.set_xticks(np.arange(len(bits)) + 0.4 - w / 2, [f"{b}b" for b in bits])
    ax.set_ylabel("unseen-patch ASR % (max over attacks)")
    ax.set_title("bars: mean over seeds; whiskers: half the seed range", fontsize=8)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
