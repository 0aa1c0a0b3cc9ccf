from qnn.bench import defense_cost


def test_interleaved_cost_gives_one_epoch_estimate_per_variant():
    """Interleaved timing: every variant trains on the same batches in turn; a defense with an attack inner loop
    (PBAT, 3 signed-gradient steps on half the batch) costs more per epoch than plain QAT."""
    from qnn.config import TrainConfig

    cfgs = [TrainConfig(model="small_cnn", dataset="synthetic", n_synthetic=640, bits=[2, 8], batch_size=64,
                        defense=d, defense_args=a, threads=1) for d, a in [("none", {}), ("pbat", {"iters": 3})]]
    secs = defense_cost.interleaved(cfgs, steps=6, warmup=1)
    assert len(secs) == 2 and all(s > 0 for s in secs)
    assert secs[1] > secs[0]


def test_defense_cost_bad_input(capsys):
    assert defense_cost.main(["--steps", "2", "--warmup", "3"]) == 2
    assert "--steps" in capsys.readouterr().err
