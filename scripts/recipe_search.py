"""The search behind conf/experiment/accuracy.yaml: candidate recipes trained side by side, judged on the
validation split only (the test set is never evaluated here).

Each candidate trains with an EMA of its weights; at the end its validation accuracy is measured four ways: the
raw weights or the EMA's, each without and with test-time shifts of 1 and 2 pixels. So one run answers whether EMA
and TTA pay. Needs only torch and torchvision (no Hydra, Optuna or MLflow), so that it runs on a lent GPU:

    python scripts/recipe_search.py --root DIR --out results.jsonl --procs 8 --seeds 1 2 --deadline 480

One JSON line per (candidate, seed) in --out, written as each run ends; --summary prints mean over seeds per
candidate, best first.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's mnist_sweep, not an installed one

# name -> (model, data, trainer, lr, weight decay); epochs are set so that one seed fits 12 min on the 2-core CPU
# (epoch seconds measured there at batch 128: accuracy net 19.6, deep 16/32 21.6, deep3 37.5, deep 24/48 47.3,
# deep 32/64 66.7)
ACC32 = dict(conv1_channels=32, conv2_channels=64, fc_width=256, conv_dropout=0.25, dropout=0.5, batch_norm=True,
             pool_each_conv=True)
DEEP3 = dict(blocks=[[32], [64], [128]], conv_dropout=0.3, dropout=0.4, fc_width=128, batch_norm=True)
ARCHES = {
    "acc32": (ACC32, 30),
    "acc32x40": (ACC32, 40),  # 40 epochs: ~12 min of the 2-core CPU with the elastic distortion's 3% more
    "deep16": (dict(blocks=[[16, 16], [32, 32]], conv_dropout=0.4, dropout=0.4, fc_width=128, batch_norm=True), 30),
    "deep3": (DEEP3, 18),
    # the CPU search (2026-11-27, epoch seconds measured at 2 threads: acc net 16.3, 48/96 21.8, deep3 26.3): as
    # many epochs as fit ~13.5 min
    "acc48x36": ({**ACC32, "conv1_channels": 48, "conv2_channels": 96}, 36),
    "deep3x30": (DEEP3, 30),
    # less dropout: with elastic distortions the accuracy net fell behind (a sign it underfits), so test whether
    # the augmentation alone regularizes it enough
    "acc32d10": ({**ACC32, "conv_dropout": 0.1, "dropout": 0.3}, 30),
    "acc32d0": ({**ACC32, "conv_dropout": 0.0, "dropout": 0.25}, 30),
    # the chosen dropout with more capacity (48/96 channels, ~11 min at 30 epochs)
    "acc48d0": ({**ACC32, "conv1_channels": 48, "conv2_channels": 96, "conv_dropout": 0.0, "dropout": 0.25}, 30),
    # 2026-11-27 #5: depth with the chosen dropout (3 conv blocks, ~13 min at 30 epochs), and the chosen recipe
    # at batch 64 (twice the steps, noisier gradients)
    "deep3d0": ({**DEEP3, "conv_dropout": 0.0, "dropout": 0.25}, 30),
    "acc32d0b64": ({**ACC32, "conv_dropout": 0.0, "dropout": 0.25}, 30),
    "deep24": (dict(blocks=[[24, 24], [48, 48]], conv_dropout=0.4, dropout=0.4, fc_width=128, batch_norm=True), 14),
    "deep32": (dict(blocks=[[32, 32], [64, 64]], conv_dropout=0.4, dropout=0.4, fc_width=128, batch_norm=True), 10),
}
BATCH_SIZES = {"acc32d0b64": 64}  # training images per step where not 128
AUGS = {
    "s2r10": dict(max_shift=2, max_rotation=10.0),
    "s2r10z1": dict(max_shift=2, max_rotation=10.0, max_zoom=0.1),
    # elastic distortions at Simard et al. (2003)'s alpha 34 / sigma 4 px and Ciresan et al. (2010)'s 36 / 6 px
    "s2r10z1e34s4": dict(max_shift=2, max_rotation=10.0, max_zoom=0.1, elastic_alpha=34.0, elastic_sigma=4.0),
    "s2r10z1e36s6": dict(max_shift=2, max_rotation=10.0, max_zoom=0.1, elastic_alpha=36.0, elastic_sigma=6.0),
}
SMOOTHING = (0.0, 0.1)


def candidates() -> list[dict]:
    out = []
    for smoothing in SMOOTHING:
        for aug_name, aug in AUGS.items():
            for arch, (model, epochs) in ARCHES.items():
                out.append(dict(name=f"{arch}-{aug_name}-ls{smoothing:g}", model=model, data=aug, epochs=epochs,
                                batch_size=BATCH_SIZES.get(arch, 128),
                                label_smoothing=smoothing, lr=0.003, weight_decay=0.05, ema_decay=0.999))
    return out


def onecycle_settings() -> dict:
    """conf/scheduler/onecycle.yaml's own shape (warm-up share, start and end factors...), read without Hydra so that
    the search trains the schedule the recipe will run; its lr, length and steps come from the candidate."""
    import yaml

    cfg = yaml.safe_load((REPO / "conf" / "scheduler" / "onecycle.yaml").read_text())
    return {k: v for k, v in cfg.items()
            if k not in ("_target_", "_partial_", "interval", "max_lr", "epochs", "steps_per_epoch")}


def run_one(job: dict, root: str, device: str) -> dict:
    import torch

    from mnist_sweep.data import DataConfig
    from mnist_sweep.model import ModelConfig
    from mnist_sweep.train import RunSpec, TrainerConfig, evaluate, fit, prepare

    torch.set_num_threads(1)
    c, seed = job["candidate"], job["seed"]
    spec = RunSpec(
        model=ModelConfig(**c["model"]),
        data=DataConfig(root, download=False, batch_size=c["batch_size"], **c["data"]),
        trainer=TrainerConfig(epochs=c["epochs"], device=device, seed=seed, channels_last=True,
                              label_smoothing=c["label_smoothing"], ema_decay=c["ema_decay"]),
        make_optimizer=functools.partial(torch.optim.AdamW, lr=c["lr"], weight_decay=c["weight_decay"]),
        make_scheduler=lambda opt, steps: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=c["lr"], epochs=c["epochs"], steps_per_epoch=steps, **onecycle_settings()),
        scheduler_interval="step")
    start = time.perf_counter()
    p = prepare(spec)
    history = fit(p)
    val = {}
    for weights, ema in (("raw", None), ("ema", p.ema)):
        for shifts in (0, 1, 2):
            q = replace(p, ema=ema, spec=replace(p.spec, trainer=replace(p.spec.trainer, tta_shifts=shifts)))
            val[f"{weights}_tta{shifts}"] = evaluate(q, p.splits.val)[0]["acc"]
    return dict(name=c["name"], seed=seed, epochs=c["epochs"], seconds=time.perf_counter() - start, val=val,
                val_by_epoch=[round(h["val/acc"], 4) for h in history])


def summary(path: Path) -> None:
    rows: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["name"], []).append(r)
    keys = ["raw_tta0", "raw_tta1", "raw_tta2", "ema_tta0", "ema_tta1", "ema_tta2"]
    # best first by the plain weights (raw, no shifts): what a run without EMA and TTA would validate at
    table = sorted(rows.items(), key=lambda kv: -statistics.mean(r["val"]["raw_tta0"] for r in kv[1]))
    print(f"{'candidate':28s} n  " + "  ".join(f"{k:>9s}" for k in keys) + "   s/run")
    for name, rs in table:
        means = [statistics.mean(r["val"][k] for r in rs) for k in keys]
        print(f"{name:28s} {len(rs)}  " + "  ".join(f"{100 * m:9.2f}" for m in means)
              + f"   {statistics.mean(r['seconds'] for r in rs):5.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="folder holding MNIST/raw/")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines, one per finished run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--procs", type=int, default=8, help="runs at once (processes sharing the device)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=480, help="seconds after which no new run starts")
    ap.add_argument("--only", nargs="*", help="candidate names to run (default: all)")
    ap.add_argument("--epochs", type=int, help="every candidate's epochs (a smoke test), instead of its own")
    ap.add_argument("--summary", action="store_true", help="print the table of --out and exit")
    args = ap.parse_args()
    if args.summary:
        summary(args.out)
        return
    import concurrent.futures as cf
    import multiprocessing as mp
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    jobs = [dict(candidate=c, seed=s) for s in args.seeds for c in candidates()
            if not args.only or c["name"] in args.only]
    for job in jobs if args.epochs else []:
        job["candidate"] = {**job["candidate"], "epochs": args.epochs}
    start = time.monotonic()
    with cf.ProcessPoolExecutor(args.procs, mp_context=mp.get_context("spawn")) as pool, args.out.open("a") as out:
        try:
            pending = set()
            queue = list(jobs)
            while queue or pending:
                while queue and len(pending) < args.procs and time.monotonic() - start < args.deadline:
                    pending.add(pool.submit(run_one, queue.pop(0), args.root, args.device))
                if not pending:
                    break
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    try:
                        r = f.result()
                    except Exception as e:  # one bad candidate must not lose the others
                        print(f"failed: {e!r}", flush=True)
                        continue
                    out.write(json.dumps(r) + "\n")
                    out.flush()
                    print(f"{time.monotonic() - start:6.0f}s {r['name']} seed {r['seed']}: "
                          + " ".join(f"{k} {100 * v:.2f}" for k, v in r["val"].items()) + f" ({r['seconds']:.0f} s)",
                          flush=True)
        except BaseException:  # Ctrl-C or a kill: the runs in flight must not go on training unseen
            for child in mp.active_children():
                child.terminate()
            raise
        print(f"{len(queue)} runs not started (deadline)", flush=True)
    summary(args.out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
