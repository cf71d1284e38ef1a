"""`python -m mnist_sweep.bench`: the machine's ceiling and the training recipes, measured side by side in one process.

1. ceiling: fp32 and bf16 matmul GFLOP/s with torch on the chosen device and thread count;
2. classic: the pytorch/examples recipe (DataLoader + ToTensor, batch 64, Adadelta, fp32) on the classic net;
3. fast (and fast_bf16 where bf16 is native): the same net, optimizer and batch size on in-memory batches;
4. speedrun / accuracy: the records, `conf/experiment/{speedrun,accuracy}.yaml`;
5. speedrun_gpu: the GPU speed record, `conf/experiment/speedrun_gpu.yaml` (bf16: left out where bf16 is emulated).

Every recipe is composed exactly as `python -m mnist_sweep <overrides>` would compose it, trained by the same
`train.fit` on the same split, and evaluated on the test set after every epoch. Two times to target are kept:
- train: the training seconds of the epochs up to the one that reaches it (device synchronized, test passes out);
- cold: a clock that starts with an empty data cache, so it also counts reading the IDX files, building the model,
  the warm-up and the per-epoch test passes.
On a GPU, or with trainer.compile, each run first warms up (train.warm_up: compilation, CUDA graph capture, cuDNN's
algorithm search), then restores its state; the warm-up's seconds are reported on their own and are on the cold
clock, never in the training time. The whole process (imports and CUDA start-up too) is timed from outside, e.g.
`time python -m mnist_sweep.bench --recipes speedrun_gpu --stop-at-target --ceiling-seconds 0`.
Record recipes run their whole schedule over --seeds seeds (unless --stop-at-target); classic and fast stop once
they reach the target. Results go to JSON and a markdown table; ratios are against the classic recipe of the run.

    python -m mnist_sweep.bench --seeds 3                 # the README table (about 40 min on a 2-core CPU)
    python -m mnist_sweep.bench --quick data.root=/tmp/x  # 1 epoch each, 1 seed: the CI smoke test
    python -m mnist_sweep.bench --recipes speedrun_gpu --seeds 3 --count-copies   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from . import machine, shell
from .data import clear_cache
from .errors import UserError
from .model import training_flops_per_image
from .train import Prepared, RunSpec, check_precision, fit, prepare, resolve_device, train_epoch, warm_up


@dataclass(frozen=True)
class Recipe:
    overrides: list[str]  # over the default config, as on the command line
    record: bool  # a record claim: run --seeds seeds and the whole schedule; else --classic-seeds, stop at target
    what: str


# classic and fast get pytorch/examples' 14 epochs (Adadelta lr 1.0, StepLR 0.7 per epoch), stopped at the target.
RECIPES = {
    "classic": Recipe(["data.loader=classic", "trainer.epochs=14"], False,
                      "pytorch/examples: DataLoader + ToTensor, batch 64, Adadelta, fp32, classic net"),
    "fast": Recipe(["trainer.channels_last=true", "trainer.epochs=14"], False,
                   "the same net, optimizer and batch on in-memory batches, channels_last"),
    "fast_bf16": Recipe(["trainer.channels_last=true", "trainer.epochs=14", "trainer.precision=bf16"], False,
                        "fast, with bf16 autocast; left out by default where bf16 is emulated (4-8x slower)"),
    "speedrun": Recipe(["experiment=speedrun"], True, "conf/experiment/speedrun.yaml: fastest to 99.0%"),
    # the record is the final fit: settings chosen on the validation split, then trained on all 60k images
    "accuracy": Recipe(["experiment=accuracy", "data.train_on_val=true"], True,
                       "conf/experiment/accuracy.yaml refit on all 60k training images: highest test accuracy"),
    "accuracy_heldout": Recipe(["experiment=accuracy"], True,
                               "conf/experiment/accuracy.yaml as chosen, 5k training images held out"),
    "speedrun_gpu": Recipe(["experiment=speedrun_gpu"], True,
                           "conf/experiment/speedrun_gpu.yaml: fastest to 99.0% on a GPU"),
}
BASELINE = "classic"
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Epoch:
    epoch: int
    epoch_seconds: float  # training only
    images_per_s: float
    gflops: float  # achieved training GFLOP/s (the model's FLOP estimate x images / epoch_seconds)
    test_acc: float
    elapsed: float  # seconds since the recipe's clock started (cold data cache), after this epoch's test pass


@dataclass
class RecipeRun:
    recipe: str
    seed: int
    setup_seconds: float  # reading MNIST, building batches and model
    epochs: list[Epoch] = field(default_factory=list)
    time_to_target: float | None = None  # elapsed at the first epoch whose test accuracy reached the target
    train_to_target: float | None = None  # training seconds of the epochs up to and including that one
    warmup_seconds: float = 0.0  # train.warm_up, before the first epoch; in elapsed, not in epoch_seconds
    data_device: str = ""  # where the training images are
    copies: dict[str, int] | None = None  # memcpys of one extra profiled training epoch, by direction (GPU only)


def matmul_gflops(dtype: torch.dtype, device: torch.device, seconds: float, max_n: int = 4096) -> float:
    """Dense square matmul throughput on random data: the ceiling a conv net's training can at best approach.

    The size grows until one product takes 20 ms (so an emulated dtype is not timed on a huge matrix)."""
    n = 128
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        a @ b  # warm-up: thread pool, kernels
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if time.perf_counter() - start > 0.02 or n >= max_n:
            break
        n *= 2
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or reps < 2:
        a @ b
        reps += 1
        _sync(device)
    return 2 * n ** 3 * reps / elapsed / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_recipe(name: str, spec: RunSpec, target: float, stop_at_target: bool,
               on_epoch: Callable[[RecipeRun], None] = lambda run: None, count_copies: bool = False) -> RecipeRun:
    """Train `spec` from a cold data cache, testing after every epoch. Returns the per-epoch figures.

    count_copies: afterwards, profile one more training epoch and count its memory copies (CUDA only)."""
    clear_cache()
    start = time.perf_counter()
    p = prepare(spec)
    run = RecipeRun(name, spec.trainer.seed, time.perf_counter() - start,
                    data_device=str(getattr(p.splits.train, "images", torch.empty(0)).device)
                    if spec.data.loader == "memory" else "cpu")
    if p.device.type == "cuda" or spec.trainer.compile:  # where the first steps pay one-off costs
        run.warmup_seconds = warm_up(p)
    flops_per_image = training_flops_per_image(spec.model)
    trained = 0.0

    def epoch_end(epoch: int, m: dict[str, float]) -> bool:
        nonlocal trained
        elapsed = time.perf_counter() - start
        trained += m["epoch_seconds"]
        test_acc = m["val/acc"]  # fit's per-epoch evaluation, on the test split here (see below)
        run.epochs.append(Epoch(epoch, m["epoch_seconds"], m["train/images_per_s"],
                                m["train/images_per_s"] * flops_per_image / 1e9, test_acc, elapsed))
        on_epoch(run)
        if run.time_to_target is None and test_acc >= target:
            run.time_to_target, run.train_to_target = elapsed, trained
            return stop_at_target
        return False

    # The bench scores every epoch on the test set: fit's per-epoch evaluation is pointed at the test split
    # instead of the validation split, so the clock counts one test pass per epoch and no validation pass.
    fit(replace(p, splits=replace(p.splits, val=p.splits.test)), epoch_end)
    if count_copies and p.device.type == "cuda":
        try:
            run.copies = profiled_copies(p)
        except (RuntimeError, OSError, ValueError) as e:  # no CUPTI: the timings above still count
            print(f"warning: {name}: the copies could not be counted: {e}", file=sys.stderr)
    return run


def profiled_copies(p: Prepared) -> dict[str, int]:
    """Memory copies of one training epoch as the CUDA profiler saw them, by direction (HtoD, DtoH, DtoD...).

    HtoD is what says whether the data stays on the GPU: 0 when every batch is sliced on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if p.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_epoch(replace(p, scheduler=None))  # the schedule is spent: one more step past its end would raise
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        return memcpy_counts(json.loads(trace.read_text()))


def memcpy_counts(trace: dict) -> dict[str, int]:
    """Count a Chrome trace's device memory copies ("Memcpy HtoD (Pageable -> Device)", ...) by direction."""
    counts = {"HtoD": 0, "DtoH": 0, "DtoD": 0}
    for event in trace.get("traceEvents", []):
        name = event.get("name", "")
        if event.get("cat") == "gpu_memcpy" and name.startswith("Memcpy "):
            direction = name.split()[1]
            counts[direction] = counts.get(direction, 0) + 1
    return counts


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[RecipeRun], ceiling: dict[str, float], precision: dict[str, str]) -> list[dict]:
    """One row per recipe: means over seeds, and ratios against the baseline recipe of the same run."""
    rows = []
    for name in dict.fromkeys(r.recipe for r in runs):
        mine = [r for r in runs if r.recipe == name]
        first = [r.epochs[0] for r in mine]  # epoch 1 of every seed: the like-for-like speed figure
        reached = [r.time_to_target for r in mine if r.time_to_target is not None]
        trained = [r.train_to_target for r in mine if r.train_to_target is not None]
        copies = next((r.copies for r in mine if r.copies is not None), None)
        gflops = statistics.fmean(e.gflops for e in first)
        rows.append({
            "recipe": name,
            "precision": precision[name],
            "seeds": len(mine),
            "epoch_seconds": mean_std([e.epoch_seconds for e in first]),
            "images_per_s": statistics.fmean(e.images_per_s for e in first),
            "gflops": gflops,
            "ceiling_fraction": gflops / ceiling[precision[name]] if precision[name] in ceiling else None,
            "test_acc_per_epoch": [mean_std([r.epochs[i].test_acc for r in mine])
                                   for i in range(min(len(r.epochs) for r in mine))],
            "final_test_acc": mean_std([r.epochs[-1].test_acc for r in mine]),
            "epochs_run": max(len(r.epochs) for r in mine),
            "time_to_target": mean_std(reached) if len(reached) == len(mine) else None,
            "train_to_target": mean_std(trained) if len(trained) == len(mine) else None,
            "reached_target": f"{len(reached)}/{len(mine)}",
            "warmup_seconds": statistics.fmean(r.warmup_seconds for r in mine),
            "data_device": mine[0].data_device,
            "copies_per_epoch": copies,
        })
    base = next((row for row in rows if row["recipe"] == BASELINE), None)
    for row in rows:
        row["epoch_speedup"] = base and base["epoch_seconds"][0] / row["epoch_seconds"][0]
        both = base and base["time_to_target"] and row["time_to_target"]
        row["time_to_target_ratio"] = both and row["time_to_target"][0] / base["time_to_target"][0]
    return rows


def _pm(ms: tuple[float, float] | None, fmt: str | None = None, scale: float = 1.0) -> str:
    """mean ± std; seconds (fmt None) get the decimals their size needs: 93.1, 9.40, 0.183."""
    if ms is None:
        return "not reached"
    mean, std = ms[0] * scale, ms[1] * scale
    fmt = fmt or (".1f" if mean >= 10 else ".2f" if mean >= 1 else ".3f")
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}" if x >= 0.01 else f"{x:.2%}"


def markdown_table(rows: list[dict], target: float) -> str:
    head = ["recipe", "prec", "seeds", "s/epoch", "img/s", "GFLOP/s", "of ceiling", "test acc % by epoch",
            "final test acc %", f"s to {target:.1%} (train)", f"s to {target:.1%} (cold)", "warm-up s",
            "HtoD copies/epoch", "epoch speedup", "time-to-target ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        curve = " ".join(f"{m * 100:.2f}" for m, _ in r["test_acc_per_epoch"])
        missed = "" if r["reached_target"].startswith(str(r["seeds"])) else f" ({r['reached_target']})"
        copies = r.get("copies_per_epoch")
        lines.append("| " + " | ".join([
            r["recipe"], r["precision"], str(r["seeds"]), _pm(r["epoch_seconds"]), f"{r['images_per_s']:,.0f}",
            f"{r['gflops']:.1f}", _fraction(r["ceiling_fraction"]), curve, _pm(r["final_test_acc"], ".2f", 100),
            _pm(r.get("train_to_target")) + missed, _pm(r["time_to_target"]) + missed,
            f"{r.get('warmup_seconds', 0.0):.2f}", "-" if copies is None else str(copies.get("HtoD", 0)),
            f"{r['epoch_speedup']:.2f}x" if r["epoch_speedup"] else "-",
            f"1/{1 / r['time_to_target_ratio']:.1f}" if r["time_to_target_ratio"] else "-",
        ]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mnist_sweep.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every recipe, e.g. trainer.threads=2")
    ap.add_argument("--recipes", default=None, help=f"comma-separated subset of {', '.join(RECIPES)} (default: all; "
                    "bf16 ones only where the device runs bf16 natively)")
    ap.add_argument("--seeds", type=int, default=1, help="seeds of each record recipe (trainer.seed = 1..N); 3 for "
                    "a record claim")
    ap.add_argument("--classic-seeds", type=int, default=1, help="seeds of the recipes on the classic net (classic, "
                    "fast): minutes per epoch on a CPU")
    ap.add_argument("--target", type=float, default=0.99, help="test accuracy whose time is measured")
    ap.add_argument("--quick", action="store_true", help="1 epoch per recipe, 1 seed, a small matmul: a smoke test")
    ap.add_argument("--stop-at-target", action="store_true", help="record recipes stop at the target too (to time "
                    "the whole process to the target)")
    ap.add_argument("--ceiling-seconds", type=float, default=None, help="seconds to time each matmul ceiling "
                    "(default 3, 0.2 with --quick); 0 skips it")
    ap.add_argument("--count-copies", action="store_true", help="on CUDA, profile one more training epoch of each "
                    "recipe and count its host<->device copies")
    ap.add_argument("--out", default="outputs/bench", help="folder for results.json and results.md")
    return ap.parse_intermixed_args(argv)  # overrides may come before or after the options


@shell.command(stopped="no results written")
def main(argv: list[str] | None = None) -> int:
    from .config import compose_spec  # Hydra stays at the edge; this module gets RunSpecs

    started = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    names = [n.strip() for n in (args.recipes or ",".join(RECIPES)).split(",") if n.strip()]
    skipped = {}
    unknown = [n for n in names if n not in RECIPES]
    if unknown or not names:
        raise UserError(f"--recipes={args.recipes!r}: unknown {', '.join(unknown) or 'empty list'}; "
                        f"allowed: {', '.join(RECIPES)}")
    if args.seeds < 1 or args.classic_seeds < 1:
        raise UserError(f"--seeds={args.seeds} and --classic-seeds={args.classic_seeds} must be >= 1")
    if args.ceiling_seconds is not None and not args.ceiling_seconds >= 0:
        raise UserError(f"--ceiling-seconds={args.ceiling_seconds} must be >= 0 (0 skips the ceiling)")
    # --quick's one epoch is an override, so that schedules composed from trainer.epochs (one-cycle) follow it
    quick = ["trainer.epochs=1"] if args.quick else []
    specs = {n: compose_spec(RECIPES[n].overrides + args.overrides + quick) for n in names}  # config errors first
    device = prepare_device(next(iter(specs.values())))
    for n, s in list(specs.items()):
        emulated = check_precision(s.trainer.precision, device)
        if emulated and args.recipes is None:
            skipped[n] = emulated
            del specs[n]
            names.remove(n)
    seconds = args.ceiling_seconds if args.ceiling_seconds is not None else 0.2 if args.quick else 3.0
    max_n = 8192 if device.type == "cuda" else 4096  # a GPU needs the larger size to reach its rate
    ceiling = {p: matmul_gflops(dtype, device, seconds, max_n) for p, dtype in PRECISION_DTYPES.items()
               if seconds > 0}
    runs = []
    for name in names:
        seeds = 1 if args.quick else (args.seeds if RECIPES[name].record else args.classic_seeds)
        for i in range(seeds):
            spec = specs[name]
            spec = replace(spec, trainer=replace(spec.trainer, seed=spec.trainer.seed + i))
            stop = args.stop_at_target or not RECIPES[name].record
            runs.append(run_recipe(name, spec, args.target, stop_at_target=stop, on_epoch=progress_line,
                                   count_copies=args.count_copies and i == 0))
    precision = {n: s.trainer.precision for n, s in specs.items()}
    rows = summarize(runs, ceiling, precision)
    table = markdown_table(rows, args.target)
    results = {"machine": machine.summary() | {"device": str(device)}, "ceiling_gflops": ceiling, "target": args.target,
               "quick": args.quick, "overrides": args.overrides, "skipped": skipped,
               "recipes": {n: asdict(RECIPES[n]) for n in names},
               "summary": rows, "runs": [asdict(r) for r in runs],
               "process_seconds": time.perf_counter() - started}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    m = results["machine"]
    notes = "".join(f"\n\n{n} not run: {why}" for n, why in skipped.items())
    (out / "results.md").write_text(f"{describe(m, ceiling)}\n\n{table}{notes}\n")
    print(f"{describe(m, ceiling)}\n\n{table}{notes}")
    print(f"\nwritten: {out / 'results.json'}, {out / 'results.md'}")
    return 0


def progress_line(run: RecipeRun) -> None:
    e = run.epochs[-1]
    print(f"{run.recipe} seed {run.seed} epoch {e.epoch}: {e.epoch_seconds:.1f}s, {e.images_per_s:,.0f} img/s, "
          f"test/acc {e.test_acc:.4f}, {e.elapsed:.1f}s since start", file=sys.stderr, flush=True)


def prepare_device(spec: RunSpec) -> torch.device:
    """The device and thread count the recipes will use, set before the ceiling is measured."""
    if spec.trainer.threads:
        torch.set_num_threads(spec.trainer.threads)
    return resolve_device(spec.trainer.device)


def describe(m: dict, ceiling: dict[str, float]) -> str:
    where = m.get("gpu") or (f"{m['cpu']} (flags: {m['cpu_flags'] or 'none listed'}), {m['logical_cores']} "
                             f"logical cores, {m['torch_threads']} torch threads")
    rates = ", ".join(f"{p} {g:,.1f} GFLOP/s" for p, g in ceiling.items()) or "not measured"
    return f"{where}; torch {m['torch']} on {m['device']}. Matmul ceiling: {rates}."


if __name__ == "__main__":
    raise SystemExit(main())
