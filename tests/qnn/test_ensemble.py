"""The evaluation attack ensemble: every attack's ASR beside the maximum, EOT only where there is a set to draw from."""

import pytest


def _data(n=64):
    from qnn.data import load_dataset

    return load_dataset("synthetic", "test", n_synthetic=2000).subset(n).tensors()


def test_ensemble_reports_each_attack_and_the_worst_case(trained_ckpt):
    from qnn.attacks.ensemble import ENSEMBLE, ensemble_asr
    from qnn.attacks.patch import PatchConfig
    from qnn.checkpoint import load_checkpoint, trained_bits

    m, obj = load_checkpoint(trained_ckpt)
    x, y = _data()
    r = ensemble_asr(m, 4, (x[:32], y[:32]), (x[32:], y[32:]), PatchConfig(patch_shape=(8, 8), batch_size=16), 3,
                     trained_bits(obj))
    assert set(r["per_attack"]) == {a.name for a in ENSEMBLE}
    assert r["asr_pct"] == max(r["per_attack"].values()) and r["per_attack"][r["worst"]] == r["asr_pct"]
    one = ensemble_asr(m, 4, (x[:32], y[:32]), (x[32:], y[32:]), PatchConfig(patch_shape=(8, 8), batch_size=16), 2,
                       [4])
    assert not any("EOT" in k for k in one["per_attack"])  # a one-bit-width model: EOT is the plain attack


def test_attack_config_keeps_the_patch_and_sets_the_optimiser():
    from qnn.attacks.ensemble import Attack, attack_config
    from qnn.attacks.patch import PatchConfig

    base = PatchConfig(patch_shape=(10, 10), shape="circle", seed=3)
    c = attack_config(base, Attack("x", optimizer="adam", step=0.01, restarts=2, eot_bits=True), 77, [8, 2, 4])
    assert (c.patch_shape, c.shape, c.seed) == ((10, 10), "circle", 3)
    assert (c.optimizer, c.step, c.restarts, c.iterations, c.eot_bits) == ("adam", 0.01, 2, 77, [2, 4, 8])


def test_snapshots_record_the_patch_along_the_optimisation(trained_ckpt):
    import torch

    from qnn.attacks.patch import PatchConfig, optimize_universal_patch
    from qnn.checkpoint import load_checkpoint
    from qnn.layers import set_bit_width_

    m, _ = load_checkpoint(trained_ckpt)
    set_bit_width_(m, 4)
    x, y = _data(32)
    patch, info = optimize_universal_patch(m, x, y, PatchConfig(patch_shape=(8, 8), iterations=4, batch_size=8,
                                                                restarts=2), snapshots=(0, 2, 4))
    snaps = info["snapshots"]
    assert sorted(snaps) == [0, 2, 4] and snaps[0].shape == (2, 3, 8, 8)
    assert not torch.equal(snaps[0], snaps[4]) and any(torch.equal(patch, s) for s in snaps[4])


@pytest.mark.parametrize("bad", [["--checkpoint", "nonsense"], ["--checkpoint", "a=/no/such/file.pt"]])
def test_attack_curve_refuses_bad_input_in_one_line(bad, capsys):
    from qnn.bench.attack_curve import main

    assert main(bad + ["--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attack_curve: error:") and "\n" not in err


def test_attack_curve_writes_a_curve_per_attack(trained_ckpt, tmp_path):
    import json

    from qnn.bench.attack_curve import main

    out = tmp_path / "curve"
    assert main(["--checkpoint", f"sw={trained_ckpt}", "--dataset", "synthetic", "--iterations", "2", "--points", "1,2",
                 "--n-craft", "32", "--n-score", "32", "--patch-size", "8", "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["points"] == [1, 2] and len(r["curves"]["sw"]) == 6
    assert all(len(c) == 2 and all(0 <= v <= 100 for v in c) for c in r["curves"]["sw"].values())


def test_attack_curve_resumes_and_refuses_to_overwrite_other_curves(trained_ckpt, tmp_path, capsys):
    import json

    from qnn.bench.attack_curve import main
    from qnn.checkpoint import sha256_file

    out = tmp_path / "curve"
    args = ["--checkpoint", f"sw={trained_ckpt}", "--dataset", "synthetic", "--iterations", "2", "--points", "1,2",
            "--n-craft", "32", "--n-score", "32", "--patch-size", "8", "--out", str(out)]
    assert main(args + ["--attacks", "adam 0.05"]) == 0
    first = json.loads(out.with_suffix(".json").read_text())
    assert first["settings"]["checkpoint_sha256"] == {"sw": sha256_file(trained_ckpt)}
    assert first["provenance"]["sw"]["adam 0.05"]["attack"]["optimizer"] == "adam"
    assert main(args + ["--attacks", "sign 0.05,adam 0.05"]) == 0
    assert "sw adam 0.05: kept from" in capsys.readouterr().out
    both = json.loads(out.with_suffix(".json").read_text())["curves"]["sw"]
    assert list(both) == ["sign 0.05", "adam 0.05"] and both["adam 0.05"] == first["curves"]["sw"]["adam 0.05"]
    before = out.with_suffix(".json").read_bytes()
    assert main(args + ["--seed", "1", "--attacks", "sign 0.05"]) == 2  # other settings: refused, nothing overwritten
    err = capsys.readouterr().err.strip()
    assert "other settings (seed)" in err and "\n" not in err and out.with_suffix(".json").read_bytes() == before
    out.with_suffix(".json").write_text("{not json")
    assert main(args) == 2 and "is not a curve file this program can resume" in capsys.readouterr().err
    for bad in (99.9 + 1, "12", float("nan")):  # edited values are refused, not republished
        edited = dict(first, curves={"sw": {"adam 0.05": [bad, 1.0]}})
        out.with_suffix(".json").write_text(json.dumps(edited))
        before = out.with_suffix(".json").read_bytes()
        assert main(args + ["--attacks", "adam 0.05"]) == 2
        err = capsys.readouterr().err.strip()
        assert "curves are malformed" in err and "\n" not in err and out.with_suffix(".json").read_bytes() == before


def test_one_definition_of_the_seen_and_unseen_suites(tmp_path):
    from qnn.attacks.suites import label, load_suite, patch_settings
    from qnn.defense_grid import table_configs
    from qnn.errors import QNNError

    by_label = {label(p): p for p in patch_settings("unseen")}
    cfgs = table_configs()
    assert [c.patch for c in cfgs[:3]] == [by_label["10x10 sq"], by_label["6.25% circ"], by_label["10x10 sq"]]
    assert cfgs[3].patch == patch_settings("seen")[0] and cfgs[3].label == "6x6 sq (seen)"
    assert [label(p) for p in patch_settings("unseen")][:2] == ["4x4 sq", "10x10 sq"]
    assert label({"patch_frac": 0.0625, "shape": "circle", "placement": "random"}) == "6.25% circ"
    with pytest.raises(QNNError, match="unknown suite"):
        load_suite("nosuch")
    bad = tmp_path / "s.yaml"
    bad.write_text("patches:\n  - {patch_shape: [4, 4], colour: red}\n")
    with pytest.raises(QNNError, match="unknown patch setting"):
        load_suite(str(bad))


def test_attack_protocol_scores_every_member_as_the_defense_table_does(trained_ckpt, tmp_path, capsys):
    """`qnn attack --protocol smoke`: each member's ASR per bit-width, the maximum and its member, per-image counts,
    an EOT patch crafted once for every bit-width; a saved patch re-scored on the protocol's images with
    `qnn.evaluation.score` (what the defense table's cells are) gives the counts back."""
    import json

    from qnn.attacks.patch import load_patch
    from qnn.checkpoint import load_checkpoint
    from qnn.cli import main
    from qnn.data import load_dataset
    from qnn.evaluation import PROTOCOLS, asr_pct, decode_scores, encode_scores, score
    from tests.conftest import cli_error

    proto = PROTOCOLS["smoke"]
    out = tmp_path / "p"
    assert main(["attack", "--checkpoint", str(trained_ckpt), "--protocol", "smoke", "--bits", "32,4",
                 "--patch-size", "8", "--out", str(out)]) == 0
    assert "4 bits: ASR" in capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert res["protocol"]["name"] == "smoke" and res["protocol"]["version"] >= 2
    for b in ("32", "4"):
        r = res["results"][b]
        assert set(r["per_attack"]) == {m.name for m in proto.members}
        assert r["asr_pct"] == max(r["per_attack"].values()) and r["per_attack"][r["worst"]] == r["asr_pct"]
        for name, s in r["scores"].items():
            f = decode_scores(s)
            assert len(f) == proto.n_score and f.max() <= proto.placements
            assert r["per_attack"][name] == pytest.approx(asr_pct(f, proto.placements))
    names = sorted(p.name for p in out.glob("patch_*.npz"))
    assert names == sorted(["patch_adam_0_05_EOT_bit_widths_eot.npz"] + [
        f"patch_{m}_{b}b.npz" for m in ("sign_0_05_x2_restarts", "adam_0_05") for b in (32, 4)])
    model, _ = load_checkpoint(trained_ckpt)
    test = load_dataset("synthetic", "test", like=model)
    score_set = test.subset(proto.n_score, start=len(test) - proto.n_score).tensors()
    for file, b, member in (("patch_adam_0_05_4b.npz", 4, "adam 0.05"),
                            ("patch_adam_0_05_EOT_bit_widths_eot.npz", 32, "adam 0.05 EOT bit-widths")):
        patch, cfg = load_patch(out / file)
        m = proto.member(member)  # the file says how its patch was crafted
        assert (cfg.optimizer, cfg.iterations, cfg.batch_size) == (m.optimizer, m.iterations, proto.batch_size)
        fooled = score(model, b, patch, cfg, score_set, proto.placements)
        assert encode_scores(fooled) == res["results"][str(b)]["scores"][member]
    # what the protocol decides is refused beside it, before any work; an unknown protocol too
    t = ["attack", "--checkpoint", str(trained_ckpt), "--protocol", "smoke", "--out", str(tmp_path / "x")]
    err = cli_error(t + ["--iterations", "3", "--attack", "pgd", "--patch-batch", "8"], capsys)
    assert "decides --attack, --iterations, --patch-batch itself" in err
    assert "unknown evaluation protocol 'nope'" in cli_error(t[:4] + ["nope"] + t[5:], capsys)
    assert not (tmp_path / "x").exists()
