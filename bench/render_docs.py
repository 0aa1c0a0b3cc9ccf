"""Render the results tables in README.md and docs/results.md from the results JSON files.

    python bench/render_docs.py           # rewrite every block between <!-- table:NAME --> and <!-- /table:NAME -->
    python bench/render_docs.py --check   # change nothing; exit 1 naming the first block that differs

A table is a function of results/*.json, so a re-run benchmark updates the docs by re-running this program, and CI
catches a table edited by hand or left behind by a new result (tests/test_docs.py runs --check).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qnn.bench.common import markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/results.md")
BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)
EARLIER = " (earlier layers)"  # results measured before every model ran on Brevitas layers (git 6419d0c)


def load(name: str) -> dict:
    from qnn.outputs import read_results_json

    return read_results_json(ROOT / "results" / name)


def pct(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


# --- QAT -----------------------------------------------------------------------------------------------------------

def qat() -> str:
    """ResNet-20 QAT, clean test accuracy %: the wide-residual switchable model and the earlier layers' rows."""
    new, old = load("qat_resnet20_brevitas.json")["results"], load("qat_resnet20.json")["results"]

    def acc(runs: dict, run: str, b: int) -> str:
        return pct(runs.get(run, {}).get("accuracy_pct", {}).get(str(b)), 2)

    rows = [["float, fine-tuned alone", acc(new, "float", 32), acc(old, "float", 32), "", ""]]
    for b in (32, 8, 4, 2):
        separate = acc(old, {32: "float", 8: "fixed8", 4: "fixed4", 2: "fixed2_r8_kd_e5"}[b], b)
        rows.append([b, acc(new, "switchable_r8_kd_e5", b), acc(old, "switchable_r8_kd_e5", b), separate,
                     acc(old, "switchable", b)])
    return markdown_table(["bits", "switchable {2,4,8,32}, wide residual", "same" + EARLIER,
                           "one model per bit-width" + EARLIER, "switchable, every tensor at the bit-width" + EARLIER],
                          rows)


def qat_all() -> str:
    """Every QAT run of both results files, accuracy % per bit-width."""
    rows = []
    for name, tag, seed in (("qat_resnet20_brevitas.json", "", 0),
                            ("qat_resnet20_brevitas_seed1.json", " (seed 1, reduce_range)", 1),
                            ("qat_resnet20.json", EARLIER, 0)):
        for run, r in load(name)["results"].items():
            if r.get("seed", 0) != seed:  # a run reused from another seed's directory is listed there
                continue
            a = r["accuracy_pct"]
            rows.append([f"`{run}`{tag}", r["epochs"], *(pct(a.get(str(b)), 2) for b in (32, 8, 4, 2))])
    return markdown_table(["run", "epochs", "32", "8", "4", "2"], rows)


# --- defense -------------------------------------------------------------------------------------------------------

EQUAL_COMPUTE = "defense_equal_compute.json"


def _equal_compute():
    from qnn.defense_report import Table, summarize

    res = load(EQUAL_COMPUTE)
    return res, summarize(res, n_boot=1000), Table(res)


def defense() -> str:
    """The defense verdict: QADT-R minus per-bit PBAT at equal compute per bit-width, with both intervals, and the
    progress of the table while it runs."""
    from qnn.defense_report import fmt_interval, verdict

    res, s, _ = _equal_compute()
    rows = [[c["bits"], f"{c['qadtr_row']} vs {c['pbat_row']}", len(c["seeds"]), f"{c['mean_diff']:+.1f}",
             fmt_interval(c["t95"]), fmt_interval(c["bootstrap95"]), verdict(c)] for c in s["comparisons"]]
    table = markdown_table(["bits", "QADT-R vs per-bit PBAT, equal compute", "seeds", "unseen ASR difference (points)",
                            "t 95%", "bootstrap 95%", "verdict"], rows) if rows else ""
    done = len(res["cells"])
    clean = [f"{r}: {v['per_bits']['4']['clean_acc_pct']:.1f} / {v['per_bits']['4']['unseen_asr_pct']:.1f}"
             for r, v in s["rows"].items() if "4" in v["per_bits"]]
    status = (f"{done} cells finished (protocol `{res['protocol']['name']}`, seeds so far "
              f"{', '.join(map(str, s['seeds'])) or 'none'}); rows with every unseen cell at 4 bits, clean % / unseen "
              f"ASR %: {'; '.join(clean) or 'none yet'}.")
    return table + ("\n" if table else "") + textwrap.fill(status, 118) + "\n"


def defense_equal_compute() -> str:
    """The whole equal-compute table as its report renders it (results/defense_equal_compute.md's tables)."""
    from qnn.defense_report import markdown

    res, s, _ = _equal_compute()
    return markdown(s, res, res.get("command", "")).split("\n", 1)[1].lstrip("\n") + "\n"


def defense_archive() -> str:
    """The earlier, equal-epochs single-seed table under a 40-iteration attack (results/archive/defense_table_cpu.json):
    clean % / unseen ASR % / adaptive ASR % per bit-width, left-out bit-widths."""
    d = load("archive/defense_table_cpu.json")
    rows = []
    for name, r in d["table"].items():
        pb = r["per_bits"]
        cells = [" / ".join(pct(pb[str(b)].get(k)) for k in ("clean_acc_pct", "unseen_asr_pct", "adaptive_asr_pct"))
                 if str(b) in pb else "-" for b in (32, 8, 4, 2)]
        left = " ; ".join(f"{pct(pb[str(b)]['clean_acc_pct'])} / {pct(pb[str(b)]['unseen_asr_pct'])}"
                          for b in (3, 5, 6) if str(b) in pb) or "-"
        cost = d["cost_interleaved_vs_qat"].get(name)
        rows.append([f"`{name}`", *cells, left, "-" if cost is None else f"{cost:.2f}"])
    return markdown_table(["setting", "32", "8", "4", "2", "left out 3 ; 5 ; 6 (clean / unseen)",
                           "cost vs QAT, interleaved"], rows)


def saturation_witness() -> str:
    """The full ensemble beside the cpu protocol and the independent attack, 4 bits, 10x10 square, seed 0."""
    from qnn.defense_report import Table

    full = Table(load("defense_equal_compute_witness.json"))
    cpu = Table(load(EQUAL_COMPUTE))
    ind = load("independent_attack_w4.json")["results"]
    rows = []
    for row, name in (("none", "qat"), ("qadtr", "qadtr")):
        f, c = full.asr(row, 0, 4, "10x10 sq"), cpu.asr(row, 0, 4, "10x10 sq")
        rows.append([row, pct(f[0]) if f else "-", (max(f[1], key=f[1].get) if f else "-"), pct(c[0]) if c else "-",
                     (max(c[1], key=c[1].get) if c else "-"),
                     " / ".join(pct(v) for v in ind[name]["start_asr_pct"]) if name in ind else "-"])
    return markdown_table(["model", "full ensemble ASR %", "its strongest attack", "cpu protocol ASR %",
                           "its strongest attack", "independent attack, per start"], rows)


def zoo_exactness() -> str:
    """Every zoo and test model x 8/4/2 bits: exact, integer only (results/zoo_exactness.json)."""
    from qnn.bench.zoo_exactness import table

    d = load("zoo_exactness.json")
    return table(d["results"], [int(b) for b in d["config"]["bits"].split(",")])


# --- parity --------------------------------------------------------------------------------------------------------

PARITY = (("parity.json", "ResNet-20" + EARLIER), ("parity_resnet20_brevitas_w4.json", "ResNet-20, wide residual"),
          ("parity_resnet20_brevitas_w2.json", "ResNet-20, wide residual"),
          ("parity_mobilenetv2_cifar.json", "MobileNetV2-CIFAR"),
          ("parity_mobilenetv3_small_cifar.json", "MobileNetV3-Small-CIFAR"))


def _inputs(r: dict) -> list[tuple[str, dict]]:
    return [("clean", r["clean"]), *r["patches"].items()]


def parity() -> str:
    """Fake-quant PyTorch vs ONNX Runtime integer, per model and bit-width, the worst over clean and patched inputs;
    the models on Brevitas layers (`parity_all` lists the earlier layers' file too)."""
    per_model: dict = {}  # one row a model, over its files (ResNet-20 has one per bit-width)
    for name, model in [(n, m) for n, m in PARITY if not m.endswith(EARLIER)]:
        d = load(name)
        row = per_model.setdefault(model, {"n": set(), "bits": [], "ins": []})
        row["n"].add(d["n"])
        row["bits"] += list(d["results"])
        row["ins"] += [v for r in d["results"].values() for _, v in _inputs(r)]
    rows = [[model, " / ".join(map(str, sorted(r["n"]))), " / ".join(r["bits"]),
             pct(min(v["logits_bit_identical_pct"] for v in r["ins"]), 2),
             pct(min(v["top1_agreement_pct"] for v in r["ins"]), 2),
             pct(max(v.get("asr_abs_diff", 0.0) for v in r["ins"]), 2)] for model, r in per_model.items()]
    return markdown_table(["model", "images", "bits", "logits bit-identical % (worst bit-width and input)",
                           "top-1 agreement % (worst)", "max ASR difference (points)"], rows)


def parity_all() -> str:
    """Every input of both parity files, with the float-form agreement and the numpy interpreter's bit-exactness."""
    rows = []
    for name, model in PARITY:
        for b, r in load(name)["results"].items():
            for inp, v in _inputs(r):
                fq = v.get("acc_fake_quant_pct", v.get("asr_fake_quant_pct"))
                it = v.get("acc_integer_pct", v.get("asr_integer_pct"))
                rows.append([model, b, inp, pct(v["logits_bit_identical_pct"], 2), pct(v["top1_agreement_pct"], 2),
                             f"{pct(fq, 2)} / {pct(it, 2)}", pct(v["float_form_agreement_pct"], 2),
                             pct(r.get("interpreter_bit_exact_pct"), 1) if inp == "clean" else ""])
    return markdown_table(["model", "bits", "input", "logits bit-identical %", "top-1 agreement %",
                           "accuracy or ASR %, fake-quant / integer", "float-form agreement %",
                           "interpreter = ORT %"], rows)


# --- latency -------------------------------------------------------------------------------------------------------

LATENCY = ("latency.json", "latency_mobilenetv2.json")


def _latency(batch: int, threads: int, bits: tuple[int, ...]) -> str:
    rows = []
    for name in LATENCY:
        for r in load(name)["results"]:
            if r["batch"] == batch and r["threads"] == threads and r["bits"] in bits:
                rows.append([r["model"], r["bits"], pct(r["ort_int_ms"], 2), pct(r["ort_float_ms"], 2),
                             f"{r['speedup_int_vs_ort_float']:.2f}x", f"{100 * r['share_of_int8_peak']:.0f}%"])
    return markdown_table(["model", "bits", "ORT integer ms", "ORT float ms", "speed-up", "share of int8 peak"],
                          rows)


def latency() -> str:
    """Batch 32, 2 threads, median ms per batch: integer ONNX vs float ONNX in ONNX Runtime."""
    return _latency(32, 2, (4,))


def latency_b1() -> str:
    """Batch 1, 1 thread: the edge-like case."""
    return _latency(1, 1, (8, 4, 2))


# --- training ------------------------------------------------------------------------------------------------------

def train_speed() -> str:
    """One training step, batch 128, 2 threads: float ms and fake-quant step time as a multiple of float."""
    rows = []
    for name, label in (("train_speed.json", "resnet20"), ("train_speed_mobilenetv2_cifar.json", "mobilenetv2_cifar"),
                        ("train_speed_compiled.json", "resnet20, --compile")):
        d = load(name)
        rows.append([f"{label} (`results/{name}`)", pct(d["ms_per_step"]["32"], 0),
                     *(f"{d['ratio'][str(b)]:.2f}x" for b in (8, 4, 2))])
    return markdown_table(["model", "float ms / step", "W8A8", "W4A4", "W2A2"], rows)


def mobilenetv2() -> str:
    """MobileNetV2-CIFAR trained from scratch as one switchable model: test accuracy % after the last epoch."""
    d = load("mobilenetv2_cifar_switchable.json")
    last = d["history"][-1]
    return markdown_table(["bits", "32", "8", "4", "2"],
                          [[f"accuracy % ({d['config']['test_subset']} test images, epoch {last['epoch']})",
                            *(pct(last["test_acc"][str(b)], 2) for b in (32, 8, 4, 2))]])


# --- defense evaluation -------------------------------------------------------------------------------------------

def attack_curve() -> str:
    """ASR % of the universal patch against attack iterations, per model and attack."""
    d = load("attack_curve_resnet20_w4.json")
    rows = [[name, att, *(pct(v) for v in c)] for name, per in d["curves"].items() for att, c in per.items()]
    return markdown_table(["model", "attack", *(str(p) for p in d["points"])], rows)


# --- against ONNX Runtime's own quantization -------------------------------------------------------------------------

def peer_latency() -> str:
    """Our default integer export and the full-range one against ORT quantize_static and ORT float (ms, speed-up)."""
    d = load("peer_latency.json")
    rows = [[r["model"], r["batch"], r["threads"], pct(r["ms"]["ours int"], 2), pct(r["ms"]["ours full-range"], 2),
             pct(r["ms"]["ORT quantize_static"], 2), pct(r["ms"]["ORT float"], 2), f"{r['ours_vs_ort_quant']:.2f}x",
             f"{r['full_range_vs_ort_quant']:.2f}x", f"{r['ours_vs_ort_float']:.2f}x"] for r in d["results"]]
    return markdown_table(["model", "batch", "threads", "ours (default)", "ours full-range", "ORT quantize_static",
                           "ORT float", "ours vs ORT quant", "full-range vs ORT quant", "ours vs ORT float"], rows)


# --- headline ------------------------------------------------------------------------------------------------------

def headline() -> str:
    """The README's first figures, one line per topic, from the same files as the tables."""
    q = load("qat_resnet20_brevitas.json")["results"]
    sw, fl = q["switchable_r8_kd_e5"]["accuracy_pct"], q["float"]["accuracy_pct"]["32"]
    inputs = [(load(name)["n"], v) for name, _ in PARITY for r in load(name)["results"].values() for _, v in _inputs(r)]
    same = min(v["logits_bit_identical_pct"] for _, v in inputs)
    speed = [r["speedup_int_vs_ort_float"] for name in LATENCY for r in load(name)["results"]
             if r["batch"] == 32 and r["threads"] == 2]
    lines = [f"**QAT**: one switchable ResNet-20 scores {sw['8']:.2f} / {sw['4']:.2f} / {sw['2']:.2f}% on CIFAR-10 at "
             f"8 / 4 / 2 bits (float {fl:.2f}%).",
             f"**Exact deployment**: ONNX Runtime's integer model gives the PyTorch model's logits bit for bit on "
             f"{same:.2f}% of images (worst case over ResNet-20 and MobileNetV2-CIFAR, 8/4/2 bits, clean and patched).",
             f"**Speed**: integer {min(speed):.1f}-{max(speed):.1f}x faster than float in ONNX Runtime (batch 32, "
             f"2 threads)."]
    return "".join(textwrap.fill(line, 118, initial_indent="- ", subsequent_indent="  ") + "\n" for line in lines)


# --- certified robustness ------------------------------------------------------------------------------------------

CERTIFIED = "certify_resnet20.json"


def certified() -> str:
    """PatchCleanser on ResNet-20, certified accuracy % for 6x6 / 4x4 patches per bit-width, masking-trained against
    undefended QAT, the defended clean accuracy at 4 bits, and on how many images ONNX Runtime's integer
    certificates equal PyTorch's (the worst cell)."""
    res = load(CERTIFIED)
    cells, n = res["cells"], res["settings"]["n_images"]
    rows = []
    for model, label in (("masking", "ResNet-20, masking-trained"), ("qat", "ResNet-20, undefended QAT")):
        got = {(b, p): cells.get(f"{model}/patchcleanser/{b}/{p}") for b in (32, 8, 4, 2) for p in (6, 4)}
        ort = [c["ort"]["n_equal"] for c in got.values() if c and "ort" in c]
        four = got[(4, 6)] or got[(4, 4)]
        rows.append([label, *(" / ".join(pct(got[(b, p)] and got[(b, p)]["certified_acc_pct"]) for p in (6, 4))
                              for b in (32, 8, 4, 2)), pct(four and four["clean_acc_pct"]),
                     f"{min(ort)}/{n} in {len(ort)} cells" if ort else "-"])
    table = markdown_table(["model", "float", "8 bits", "4 bits", "2 bits", "defended clean % (4 bits)",
                            "ORT certificates = PyTorch's"], rows)
    return table + certified_verdict(res)


def certified_verdict(res: dict) -> str:
    """What the certification table says, computed from it: masking training's gain over undefended QAT, the bit-widths
    where nothing certifies, CertMask's best, ORT's agreement and the attack cross-check, and the defended inference's
    cost on the device (results/certify_latency_resnet20_w4.json)."""
    cells = res["cells"]
    acc = lambda m, meth, b, p: (cells.get(f"{m}/{meth}/{b}/{p}") or {}).get("certified_acc_pct")  # noqa: E731
    gains = {p: [acc("masking", "patchcleanser", b, p) / acc("qat", "patchcleanser", b, p) for b in (32, 8, 4)
                 if acc("masking", "patchcleanser", b, p) is not None and acc("qat", "patchcleanser", b, p)]
             for p in (4, 6)}
    span = lambda v: f"{min(v):.1f}x" if max(v) - min(v) < 0.05 else f"{min(v):.1f}-{max(v):.1f}x"  # noqa: E731
    none_at = [b for b in (32, 8, 4, 2) if all(acc(m, "patchcleanser", b, p) == 0 for m in ("masking", "qat")
                                                for p in (4, 6))]
    certmask = [c["certified_acc_pct"] for c in cells.values() if c["method"] == "certmask"]
    ort = [c["ort"] for c in cells.values() if "ort" in c]
    wrong = sum(c["cross_check"]["violations"] for c in cells.values()) + sum(
        v["defended_wrong"] for c in cells.values() if (e := c.get("ensemble_cross_check")) for v in e["members"].values())
    parts = []
    if gains[4] and gains[6]:
        parts.append(f"masking training certifies {span(gains[4])} (4x4) and {span(gains[6])} (6x6) as many images "
                     f"as QAT at float / 8 / 4 bits")
    if none_at:
        parts.append(f"nothing at {' / '.join(map(str, none_at))} bits")
    line = "Verdict: " + ", ".join(parts) + "."
    if certmask:
        line += f" CertMask's single round certifies {max(certmask):.1f}% at most."
    if ort:
        line += (f" ORT's certificates equal PyTorch's on {min(o['n_equal'] for o in ort)}/{res['settings']['n_images']}"
                 f" images in all {len(ort)} integer cells; attacks broke {wrong}.")
    try:
        lat = load("certify_latency_resnet20_w4.json")
    except Exception:  # noqa: BLE001  the latency file is optional; its absence is stated
        lat = None
    if lat and lat.get("certify", {}).get("latency"):
        c, t = lat["certify"], lat["certify"]["latency"]
        line += (f" ORT int, {lat['bits']} bits, {c['patch_size'][0]}x{c['patch_size'][1]}: "
                 f"{c['forwards_per_image_inference_mean']:.0f} forwards, {t['p50_ms']:.0f} ms p50 ({t['mean_ms']:.0f} "
                 f"mean) an image.")
    else:
        line += " The defended inference's latency is not measured yet (results/certify_latency_resnet20_w4.json)."
    return "\n".join(textwrap.wrap(line, 118)) + "\n"


def certified_all() -> str:
    """Every certification cell (results/certify_resnet20.md's tables)."""
    from qnn.bench.certify_table import tables

    return tables(load(CERTIFIED))


TABLES = {"headline": headline, "certified": certified, "certified-all": certified_all, "qat": qat, "qat-all": qat_all, "defense": defense,
          "defense-equal-compute": defense_equal_compute, "defense-archive": defense_archive,
          "saturation-witness": saturation_witness, "zoo-exactness": zoo_exactness, "parity": parity,
          "parity-all": parity_all, "latency": latency, "latency-b1": latency_b1, "train-speed": train_speed,
          "mobilenetv2": mobilenetv2, "attack-curve": attack_curve, "peer-latency": peer_latency}


def render(text: str) -> str:
    """`text` with every marked block replaced by its table; an unknown block name is an error."""
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SystemExit(f"render_docs: unknown table block '{name}' (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[name]() + m.group(4)

    return BLOCK.sub(sub, text)


def stale_blocks(path: Path) -> list[str]:
    """Names of the blocks in `path` whose text differs from what render() writes."""
    text = path.read_text()
    new = {m.group("name"): m.group("body") for m in BLOCK.finditer(render(text))}
    return [m.group("name") for m in BLOCK.finditer(text) if m.group("body") != new[m.group("name")]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block differs from its rendering")
    ap.add_argument("files", nargs="*", default=list(DOCS), help=f"markdown files to render (default {' '.join(DOCS)})")
    a = ap.parse_args(argv)
    for f in a.files:
        path = ROOT / f
        if a.check:
            stale = stale_blocks(path)
            if stale:
                print(f"{f}: table block '{stale[0]}' is stale; run python bench/render_docs.py")
                return 1
        else:
            text = path.read_text()
            new = render(text)
            if new != text:
                path.write_text(new)
                print(f"rendered {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
