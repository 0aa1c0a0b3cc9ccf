"""Training cost of several configurations, measured interleaved: every configuration takes the same batches, one
step of each in turn (the order rotating every step), so that a slow spell of a shared machine costs them all alike.
Seconds per epoch are the mean step time x steps per epoch."""

from __future__ import annotations


def interleaved_epoch_seconds(cfgs: list, steps: int, warmup: int) -> list[float]:
    """Estimated seconds per epoch of each configuration from `steps` training steps taken in turn (rotating order)."""
    import math
    import time

    import torch

    from qnn.data import iterate_batches, model_fit_kwargs, train_test_sets
    from qnn.defenses import make_defense
    from qnn.train import BitSchedule, _device, init_model, init_scales_, make_optimizer, train_step

    c0 = cfgs[0]
    dev = _device(c0)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    torch.set_num_threads(c0.threads)
    fit = model_fit_kwargs(c0)
    ds, _ = train_test_sets(c0, init_model(c0, **fit))  # made to fit the model (channels, size, classes)
    per_epoch = math.ceil(len(ds) / c0.batch_size)
    batches = []
    for xb, yb in iterate_batches(ds, c0.batch_size, True, True, c0.seed, 0, 0, 1):
        batches.append((xb.to(dev), yb.to(dev)))
        if len(batches) == steps:
            break
    runs = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        model = init_model(c, **fit).to(dev)
        init_scales_(model, c.bits, batches[0][0])
        model.train()
        defense = make_defense(c.defense, c.defense_args, c, model)
        opt = make_optimizer(c, model, defense)
        runs.append((model, defense, opt, BitSchedule(c.bits, c.schedule, c.seed, per_epoch), []))
    for i, (xb, yb) in enumerate(batches):
        for j in range(len(runs)):
            model, defense, opt, sched, times = runs[(i + j) % len(runs)]
            bits = defense.choose_bits(i, sched(i))
            sync()
            t0 = time.perf_counter()
            train_step(model, model, defense, opt, xb, yb, bits, i)
            sync()
            times.append(time.perf_counter() - t0)
    return [sum(t[warmup:]) / len(t[warmup:]) * per_epoch for *_, t in runs]
