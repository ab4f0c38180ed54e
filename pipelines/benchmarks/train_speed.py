"""Training epoch time of this checkout against an earlier commit (default 3d83f78), side by side in one run.

Inputs: none (the city is generated, seeded); git, to check the earlier commit out. Run from the repository
root: `python -m pipelines.benchmarks run train_speed` (about ten minutes on 2 cores, one thread each). The
earlier commit is checked out as a detached git worktree under the temporary folder (removed at the end); one
feature store of a synthetic city with many classes is written once, and each code trains on it (`train_files`, default
TrainConfig, --epochs epochs, no val split) in a fresh process whose PYTHONPATH is its own tree, alternating
(this, earlier, this, earlier, ...), --pairs times each. An epoch's time is what train records for it (the
steps only: no val, no saving); the first epoch of each process is left out (allocator, kernels and page cache
warming). A naive reference trainer runs beside them (--naive): a plain projection and one cosine head per
group (logits s·cos θ, no margin), AdamW, over the same class-balanced batches as this checkout draws, timed the
same way; what a dcfeat epoch costs on top of the matrix products themselves. --threads: each process's
threads, one by default: on the 2 shared cores two-thread processes beside other work oversubscribe them (an
epoch of the default city took 311 s instead of ~25 s at a load average of 6).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from dcfeat.synthetic.features import make_city, write_city
from pipelines.benchmarks.markdown import command, measured, not_measured, table
from pipelines.benchmarks.records import ROOT

BASELINE = "3d83f78"  # issue 27: "no slower than 3d83f78"
OPTIONS = [
    click.Option(["--streets"], default=26, show_default=True, type=click.IntRange(2),
                 help="Streets each way of the synthetic city (classes and train rows grow as its square)."),
    click.Option(["--epochs"], default=2, show_default=True, type=click.IntRange(2),
                 help="Epochs per training process (the first is left out)."),
    click.Option(["--pairs"], default=3, show_default=True, type=click.IntRange(1),
                 help="Training processes of each code, alternating."),
    click.Option(["--threads"], default=1, show_default=True, type=click.IntRange(1),
                 help="Threads of each training process (OMP_NUM_THREADS)."),
    click.Option(["--baseline"], default=BASELINE, show_default=True, help="The earlier commit."),
    click.Option(["--naive/--no-naive"], default=True, show_default=True,
                 help="Also time the naive reference trainer."),
]

# Run in a fresh process with PYTHONPATH at one tree: train and print each epoch's seconds.
TRAIN = """
import json, sys
from pathlib import Path
from dcfeat.train import TrainConfig, train_files
store, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
result = train_files(store, "train", TrainConfig(epochs=epochs), out=out, device="cpu", progress=False)
print(json.dumps({"seconds": [e["seconds"] for e in result.epochs], "classes": result.classes}))
"""

# The naive reference, in this checkout's process: the run's partition, sampler and batches, a plain step.
NAIVE = """
import json, sys, time
from pathlib import Path
import torch, torch.nn.functional as F
from dcfeat.presets import TrainConfig
from dcfeat.sampling import BalancedSampler, InMemoryBatches
from dcfeat.store import read_split
from dcfeat.train import group_order, make_partition
store, epochs = Path(sys.argv[1]), int(sys.argv[3])
config = TrainConfig(epochs=epochs)
split = read_split(store, "train")
part = make_partition(split, config)
torch.manual_seed(config.seed)
gen = torch.Generator().manual_seed(config.seed)
sampler = BalancedSampler(part, torch.device("cpu"), gen)
batches = InMemoryBatches(torch.as_tensor(split.embeddings), sampler, config.batch_size)
groups = group_order(part, config.group_order)
steps = max(len(groups), -(-int((part.class_index >= 0).sum()) // config.batch_size))  # as train counts them
projection = torch.nn.Linear(split.embeddings.shape[1], config.dim)
heads = [torch.nn.Parameter(torch.randn(c, config.dim) * 0.01) for c in part.classes_per_group]
opt = torch.optim.AdamW([*projection.parameters(), *heads], lr=1e-3, weight_decay=1e-4)
seconds = []
for epoch in range(epochs):
    t0 = time.perf_counter()
    for step in range(steps):
        g, x, labels = batches(step, groups)
        h = F.normalize(projection(x.float()), dim=1)
        logits = config.s * F.linear(h, F.normalize(heads[g], dim=1))
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds.append(time.perf_counter() - t0)
print(json.dumps({"seconds": seconds, "classes": len(part.classes)}))
"""


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _train(script: str, tree: Path, store: Path, out: Path, epochs: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-c", script, str(store), str(out), str(epochs)], capture_output=True,
                       text=True, env=env, cwd=tree)
    if r.returncode:
        raise SystemExit(f"training in {tree} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(*, streets: int = 26, epochs: int = 2, pairs: int = 3, threads: int = 1, baseline: str = BASELINE,
            naive: bool = True) -> dict:
    city = {"seed": 0, "streets": streets}
    codes = {"current": _git("rev-parse", "--short", "HEAD"), "baseline": _git("rev-parse", "--short", baseline)}
    out = {"city": f"make_city({', '.join(f'{k}={v}' for k, v in city.items())})", "epochs": epochs,
           "pairs": pairs, "codes": codes, "train": f"TrainConfig(epochs={epochs}), no val split",
           "threads": threads, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, earlier = tmp / "city.h5", tmp / f"dcfeat-{baseline}"
        city_ = make_city(**city)
        out["train_rows"] = city_.size("train")
        write_city(city_, store, splits=("train",))
        del city_
        _git("worktree", "add", "--detach", str(earlier), baseline)
        try:
            trees = {"current": ROOT, "baseline": earlier}
            kinds = [*trees, *(["naive"] if naive else [])]
            runs = {kind: [] for kind in kinds}
            for i in range(pairs):
                for kind in kinds:
                    script, tree = (NAIVE, ROOT) if kind == "naive" else (TRAIN, trees[kind])
                    got = _train(script, tree, store, tmp / f"run-{kind}-{i}", epochs, threads)
                    runs[kind].append(got["seconds"])
                    out["classes"] = got["classes"]
                    print(json.dumps({kind: got["seconds"]}), flush=True)
        finally:
            _git("worktree", "remove", "--force", str(earlier))
    out["runs"] = runs
    out["seconds"] = {kind: statistics.median(s for run in r for s in run[1:]) for kind, r in runs.items()}
    out["current_over_baseline"] = out["seconds"]["current"] / out["seconds"]["baseline"]
    if naive:
        out["current_over_naive"] = out["seconds"]["current"] / out["seconds"]["naive"]
        out["baseline_over_naive"] = out["seconds"]["baseline"] / out["seconds"]["naive"]
    out["load_average"] = os.getloadavg()[0]
    return out


def render(results: list[dict]) -> str:
    if not results:
        return not_measured("train_speed")
    r = results[-1]
    s = r["seconds"]
    spread = {kind: [e for run in runs for e in run[1:]] for kind, runs in r["runs"].items()}
    span = lambda kind: f"{min(spread[kind]):.1f}–{max(spread[kind]):.1f}"  # noqa: E731
    rows = [[f"this checkout ({r['codes']['current']})", f"**{s['current']:.2f}**", span("current"),
             f"**{r['current_over_baseline']:.2f}**", f"{r['current_over_naive']:.2f}" if "naive" in s else "—"],
            [f"{r['codes']['baseline']}", f"{s['baseline']:.2f}", span("baseline"), "1",
             f"{r['baseline_over_naive']:.2f}" if "naive" in s else "—"]]
    if "naive" in s:
        rows.append(["naive reference trainer", f"{s['naive']:.2f}", span("naive"), f"{s['naive'] / s['baseline']:.2f}",
                     "1"])
    return (f"`{r['city']}` ({r['classes']:,} classes, {r['train_rows']:,} train rows), `{r['train']}`, on the "
            f"CPU, {r['threads']} thread{'s' * (r['threads'] > 1)}; each code in a fresh process with its own tree on "
            f"PYTHONPATH, alternating, {r['pairs']} "
            f"processes each, the median over their epochs after the first{measured(r)}, load average "
            f"{r['load']['before']:.1f} before and {r['load']['after']:.1f} after ({command('train_speed')}). The "
            "naive reference: a plain projection and one cosine head per group, no margin, AdamW, over the same "
            "batches. Goal (issue 27): no slower than 3d83f78.\n\n"
            + table(["code", "seconds per epoch (median)", "range over the processes", "over 3d83f78",
                     "over the naive trainer"], rows))
