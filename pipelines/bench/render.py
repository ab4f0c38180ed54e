"""BENCHMARKS.md from the recorded results in pipelines/results/ (no measuring here).

Each section turns one results file into a caption and a table; the longer
prose lives in BENCHMARKS.template.md, whose `$name` placeholders the sections
fill. A result without a recorded date says so instead of taking today's.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from string import Template

import h5py
import numpy as np
import polars as pl
import torch

from dcfeat import __version__
from pipelines.bench.markdown import measured, table
from pipelines.bench.render_gpu import gpu, gpu_check
from pipelines.bench.render_queries import confidence, hybrid_speed

TEMPLATE = Path(__file__).with_name("BENCHMARKS.template.md")
# cpu.json was first recorded without its date and software; these are the ones the
# BENCHMARKS.md written by that run stated.
FIRST_CPU_RUN = {"date": "2026-11-26", "env": {"dcfeat": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu",
                                               "numpy": "2.4.6", "h5py": "3.16.0", "hdf5": "2.0.0"}}


def rendered_with() -> dict:
    """The software this process runs: what `measure` records with its results."""
    return {"dcfeat": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}


def _versions(env: dict) -> str:
    return (f"dcfeat {env['dcfeat']}, Python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, "
            f"h5py {env['h5py']} (HDF5 {env['hdf5']})")


def header(cpu: dict) -> str:
    cpu = {**FIRST_CPU_RUN, **cpu}
    return (f"CPU figures measured {cpu['date']} with {_versions(cpu['env'])}. Every section is rendered by "
            "`pipelines/bench.py` from the results recorded in `pipelines/results/`, each with its own date "
            "where one was recorded.")


def extraction(cpu: dict) -> str:
    dec, ex = cpu["decode"], cpu["extract"]
    return table(["what", "measured"], [
        ["decode + preprocess 512×512 JPEG → 224 crop, one process (= per core)",
         (f"full decode {dec['full']:.0f} img/s; draft decode {dec['draft']:.0f} img/s "
          f"(**{dec['draft'] / dec['full']:.1f}×**)")],
        ["draft vs full decode, same crops", (f"mean absolute difference "
                                              f"{dec['draft_mean_abs_diff_grey_levels']:.2f} grey levels (of 255): "
                                              "draft is on by default")],
        [(f"extraction end to end / backbone only, ViT-S/14 on CPU, batch {ex['batch_size']}, {ex['workers']} "
          f"workers, {ex['images']} images"),
         f"{ex['end_to_end_img_s']:.1f} / {ex['backbone_only_img_s']:.1f} img/s = **{ex['ratio']:.2f}**"]])


def training(cpu: dict) -> str:
    tr, st, loop = cpu["train_200k"], cpu["step"], cpu["backbone_in_loop"]
    return table(["what", "measured", "goal"], [
        [f"epoch, {tr['rows']:,} rows × 768, {tr['classes']:,} classes, batch {tr['batch_size']}, CPU",
         f"**{tr['seconds_per_epoch']:.1f} s/epoch**, {tr['samples_per_s']:,.0f} samples/s", "seconds"],
        [f"same step with a ViT-S/14 forward per sample, batch {loop['batch_size']}, CPU",
         (f"{loop['backbone_in_loop_samples_per_s']:.1f} vs {loop['cached_samples_per_s']:,.0f} samples/s: "
          f"**{loop['ratio']:,.0f}×**"), "≥ 100×"],
        [(f"cached step vs `torch.mm` at the same shapes (batch {st['batch_size']}, 768→512, "
          f"{st['classes_per_group']:,} classes), CPU"),
         f"{st['step_ms']:.1f} ms vs {st['mm_ms']:.1f} ms: fraction **{st['fraction_of_mm']:.2f}**", "≥ 0.5"]])


def recall_cells(m: dict) -> list[str]:
    """LR@1/5/10/20 in % and the median error of one method's report entry."""
    return [*(f"{100 * m['recall'][k]:.1f}" for k in ("1", "5", "10", "20")), f"{m['median_error_m']:.1f} m"]


def methods_table(city: dict) -> str:
    return table(["method", "LR@1", "LR@5", "LR@10", "LR@20", "median error", "ms/query"], [
        [name, *recall_cells(m), f"{m['ms_per_query']:.4f}"] for name, m in city["methods"].items()])


def city(cpu: dict) -> str:
    c = cpu["city"]
    return (f"`make_city(seed=0)`: {c['train_rows']:,} train rows, {c['classes']} classes, {c['queries']} test "
            f"queries under unseen conditions, {c['database_rows']:,}-row database; default `TrainConfig` "
            f"({c['train_seconds']:.0f} s of training, best epoch {c['best_epoch']}). Same queries for every row:"
            f"\n\n{methods_table(c)}")


def city_1m(cpu: dict) -> str:
    big = cpu["city_1m"]
    m = big["methods"]
    over = {space: m[f"retrieve ({space})"]["ms_per_query"] / m["classify"]["ms_per_query"]
            for space in ("projected", "raw")}
    return (f"`make_city(seed=0, streets=40, db_spacing_m=1)`: {big['database_rows']:,}-row database × 768, "
            f"{big['train_rows']:,} train rows, {big['classes']:,} classes, {big['queries']} queries; CPU, same run:"
            f"\n\n{methods_table(big)}\n\nClassification answers **{over['projected']:.0f}×** faster than exact "
            f"retrieval in the learned space and **{over['raw']:.0f}×** faster than on raw features (goal ≥ 20×).")


def sweep(path: Path) -> str:
    if not path.is_file():
        return "(no sweep recorded: run pipelines/sweep_train.py)"
    d = pl.read_ndjson(path)
    rows = []
    for col in ("s", "m", "dim", "batch_size", "lr_projection", "lr_heads"):
        for row in d.group_by(col).agg(pl.col("val_lr1").mean(), pl.col("test_lr1").mean()).sort(col).iter_rows():
            rows.append([col, f"{row[0]:g}", f"{100 * row[1]:.1f}", f"{100 * row[2]:.1f}"])
    best = d.sort("val_lr1", descending=True).head(3).select(
        "s", "m", "dim", "batch_size", "lr_projection", "lr_heads", "val_lr1", "test_lr1")
    return (f"{d.height} settings, 8 epochs each, on `make_city(seed=0)` (14 480 train rows, 745 classes); chosen "
            "by val LR@1, test LR@1 shown for information. Mean over the other settings for each value:\n\n"
            + table(["parameter", "value", "mean val LR@1", "mean test LR@1"], rows)
            + f"\n\nBest three by val LR@1:\n\n```\n{best}\n```")


def finetune(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_finetune.py`."
    ft = json.loads(path.read_text())
    c = ft["city"]
    runs = table(["tuned blocks K", "block lr", "test LR@1", "test LR@5", "best val LR@1", "s/epoch",
                  "peak RSS of `dcfeat train`"],
                 [[r["K"], r["lr_blocks"] or "1e-05 (default)", f"{100 * r['test_lr1']:.1f}", f"{100 * r['test_lr5']:.1f}",
                   f"{100 * r['best_val_lr1']:.1f}", f"{r['seconds_per_epoch']:.2f}", f"{r['peak_rss_mb']:.0f} MB"]
                  for r in c["runs"].values()])
    steps = table(["K", "step on cached tokens", "same step from decoded images (first L − K blocks frozen)",
                   "speed-up", "L/K", "(L + 2K)/3K"],
                  [[s["K"], f"{s['tokens_samples_per_s']:.1f} samples/s", f"{s['images_samples_per_s']:.1f} samples/s",
                    f"**{s['speedup']:.1f}×**", f"{s['layers'] / s['K']:.0f}",
                    f"{(s['layers'] + 2 * s['K']) / (3 * s['K']):.1f}"] for s in ft["step"]])
    return (f"Rendered street city (`dcfeat.synthetic.streets`, {c['train_rows']:,} train images, 40 test queries at dusk), "
            f"crop {c['image_size']}, the demo's **randomly initialised** DINOv2-S/14 (no pretrained weights here: "
            f"these LR@1 measure whether tuning works through the pipeline, not what it gains on DINOv2), "
            f"{c['epochs']} epochs, default projection and head rates, one process per run{measured(ft)}:\n\n{runs}"
            f"\n\nDisk per image for the cached tokens: {c['token_bytes_per_image']:,} B at this crop (the tokens "
            "entering block L − K have the same shape for every K; ViT-B/14 at 224: 257 × 768 × 2 B = 394,752 B)."
            f"\n\n{steps}\n\nViT-S/14 at 224, batch 32, CPU, median of 3 steps after a warm-up.")


def fingerprint(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_fingerprint.py`."
    fp = json.loads(path.read_text())
    secs = fp["fingerprint_s"]
    return (f"{fp['model']}, {fp['tensor_bytes'] / 1e6:,.0f} MB of tensors, {fp['device']} ({fp['cpu']}), median "
            f"of {fp['repeats']}{measured(fp)} (`pipelines/bench_fingerprint.py`):\n\n"
            + table(["what", "measured"], [
                ["fingerprint of every tensor + the architecture, sha256 (the hash used)", f"{secs['sha256']:.2f} s"],
                ["the same with blake2b, for comparison", f"{secs['blake2b']:.2f} s"],
                ["`load_backbone` in full (fingerprint included)", f"{fp['load_backbone_s']:.2f} s"]]))


def scoring(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_scoring.py`."
    sc = json.loads(path.read_text())
    rows = [[f"{method} ({name})", *recall_cells(m)]
            for name, methods in sc["scorings"].items() for method, m in methods.items()]
    return (f"`{sc['city']}`, one trained run (default `TrainConfig`), the same 500 test queries and database for "
            f"both rankings{measured(sc)} (`pipelines/bench_scoring.py`):\n\n"
            + table(["method (cells ranked by)", "LR@1", "LR@5", "LR@10", "LR@20", "median error"], rows))


def crop(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_crop.py`."
    cr = json.loads(path.read_text())
    rows = [[f"{name}: {', '.join(r['shapes'])}", *(f"{r[c]['img_s']:.1f} ({r[c]['patches_per_image']:.0f})"
                                                    for c in ("centre", "full")), f"**{r['full_over_centre']:.2f}**"]
            for name, r in cr["sets"].items()]
    return (f"A {cr['model']} on this CPU (shared: 1-minute load average {cr['load_average_before']:.1f} before, "
            f"{cr['load_average_after']:.1f} after), `--image-size {cr['image_size']}`, batch {cr['batch_size']}, "
            f"{cr['workers']} workers, {cr['images']} JPEGs per set; `extract` end to end, median of {cr['repeats']} "
            f"runs after a warm-up, the two crops alternating; full ÷ centre is the median of the ratios of "
            f"consecutive runs{measured(cr)} (`pipelines/bench_crop.py`):\n\n"
            + table(["images", "centre: img/s (patches per image)", "full: img/s (patches per image)",
                     "full ÷ centre"], rows))


def presets(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_presets.py`."
    pr = json.loads(path.read_text())

    def mean(runs: list[dict], value) -> float:
        return float(np.mean([value(r) for r in runs]))

    test1 = {name: [r["test_recall"]["1"] for r in row["runs"]] for name, row in pr["rows"].items()}
    cells = [[name, ", ".join(str(r["kept_epoch"]) for r in row["runs"]) + f" of {row['runs'][0]['epochs']}",
              f"{100 * mean(row['runs'], lambda r: r['val_lr1']):.1f}",
              f"**{100 * np.mean(test1[name]):.1f}** ({100 * min(test1[name]):.1f}-{100 * max(test1[name]):.1f})",
              f"{100 * mean(row['runs'], lambda r: r['test_recall']['5']):.1f}",
              f"{mean(row['runs'], lambda r: r['train_seconds']):.0f} s"] for name, row in pr["rows"].items()]
    paper = float(np.mean(test1["dc-paper"]))
    effects = sorted(((float(np.mean(v)) - paper, name.split(", ", 1)[1].removesuffix(" as dcfeat"))
                      for name, v in test1.items() if name.startswith("dc-paper, ")), reverse=True)
    return (f"`{pr['city']}`, the same 500 test queries for every run (classify), each row trained with seeds "
            f"{', '.join(map(str, pr['seeds']))}{measured(pr)} (`pipelines/bench_presets.py`, one thread). Every "
            f"dc-paper row trains {pr['epochs']} epochs of its 2,000 steps at batch 64 (one epoch per group) "
            f"instead of the preset's up to 500, to keep this CPU benchmark short: {pr['epochs'] * 2000 * 64:,} "
            "samples, against at most 10 × 14,480 for dcfeat's 10 one-pass epochs. Within so few epochs the "
            "plateau schedule (patience 10) never cuts a rate. The row \"batch, length as dcfeat\" trains dcfeat's "
            "10 one-pass epochs at batch 256. LR@1 in %, mean over the seeds (test: lowest-highest):\n\n"
            + table(["training", "epoch kept (per seed)", "val LR@1 of the epoch kept", "test LR@1", "test LR@5",
                     "train time"], cells)
            + "\n\nMean test LR@1 gained by setting one difference to dcfeat's value, from dc-paper's "
            + f"{100 * paper:.1f}: " + "; ".join(f"{name} {100 * d:+.1f}" for d, name in effects) + ".")


def negatives(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_negatives.py`."
    ng = json.loads(path.read_text())
    full, sampled = ng["step_s"]["1.0"], ng["step_s"]["0.1"]
    rows = [[f"training step, batch {ng['batch']}, 768→512, {ng['classes']:,} classes in one group",
             f"r = 1: {full:.1f} s; r = 0.1: {sampled:.1f} s; **{full / sampled:.1f}×**", "≥ 3×"],
            *[[f"`make_city(seed=0)`, default `TrainConfig`, r = {r}", f"best val LR@1 {100 * c['best_val_lr1']:.1f}, "
               f"{c['seconds_per_epoch']:.2f} s/epoch", "r = 0.2 within 1 point of r = 1"]
              for r, c in ng["city"].items()]]
    return (f"CPU, median of 3 steps after one that allocates AdamW's state{measured(ng)} "
            "(`pipelines/bench_negatives.py`, timing `train.train_step`):\n\n" + table(["what", "measured", "goal"], rows))


def streamed(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_streamed.py`."
    st = json.loads(path.read_text())
    rows = [[f"{name.replace('_', ' ')} (`--memory-budget {r['budget']}`)", f"{r['samples_per_s']:,.0f}",
             f"{r['peak_rss_mb']:,.0f} MB", f"{100 * r['best_val_lr1']:.1f}"]
            for name, r in (("in_memory", st["in_memory"]), ("streamed", st["streamed"]))]
    return (f"`{st['city']}`: {st['rows']:,} train rows, {st['split_mb']:.0f} MB of float16 features; default "
            f"`TrainConfig`, each run its own `dcfeat train` process{measured(st)} (`pipelines/bench_streamed.py`). "
            f"Streamed samples/s ÷ in-memory: **{st['samples_ratio']:.2f}** (goal ≥ 0.8); peak RSS within the "
            "budget + 1.5 GB (goal):\n\n" + table(["split", "samples/s", "peak RSS", "best val LR@1"], rows))


def cli(path: Path) -> str:
    """`dcfeat --help` against `import torch`, fresh processes side by side (pipelines/bench_cli.py)."""
    c = json.loads(path.read_text())
    m = c["median_s"]
    return (f"On this 2-core CPU{measured(c)}: median of {c['runs']} fresh processes each, alternating (`pipelines/bench_cli.py`); "
            f"the interpreter alone starts in {m['python']:.2f} s.\n\n" + table(["what", "measured", "goal"], [
                ["`dcfeat --help` / `python -c \"import torch\"`",
                 f"{m['dcfeat --help']:.2f} s / {m['import torch']:.2f} s = **{c['help_over_torch']:.2f}**", "≤ 0.2"],
                ["`dcfeat --version` / `python -c \"import torch\"`",
                 f"{m['dcfeat --version']:.2f} s / {m['import torch']:.2f} s = **{c['version_over_torch']:.2f}**",
                 "≤ 0.2"],
                *([["`dcfeat extract` offline, the hub model not cached: refused (exit 6) naming `--random-backbone`",
                    f"**{m['dcfeat extract offline']:.2f} s**", "< 2 s"]] if "dcfeat extract offline" in m else [])]))


def serve(path: Path) -> str:
    """`dcfeat serve` on loopback against `dcfeat predict`, the soak and the hostile set (pipelines/bench_serve.py)."""
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_serve.py`."
    sv = json.loads(path.read_text())
    t, soak, m = sv["throughput"], sv["soak"], sv["model"]
    hostile = [[h["case"], "—" if h["wanted"] is None else h["wanted"], "—" if h["got"] is None else h["got"],
                "yes" if h["answering_after"] else "**no**"] for h in sv["hostile"]]
    ok = all(h["answering_after"] and h["wanted"] == h["got"] for h in sv["hostile"])
    return (f"**{m['notice']}**: a randomly initialised DINOv2 (hidden size {m['hidden']}, {m['layers']} layers) at "
            f"{m['image_size']} px, trained on a rendered synthetic street city, so that 10,000 requests finish in "
            f"minutes on this {sv['cpu_count']}-core CPU: the figures measure the service (HTTP, decoding, batching), "
            f"not DINOv2{measured(sv)}. Every request goes to 127.0.0.1 from one client process on the same "
            f"2 cores (a hand-written keep-alive HTTP/1.1 client, {sv['clients']} connections, one "
            f"{sv['photo_bytes_mean'] / 1024:.0f} kB JPEG per request); the machine was shared (1-minute load "
            f"average {sv['load_average_before']:.1f} before, {sv['load_average_after']:.1f} after). Throughput: "
            f"the same {sv['images']:,} photos through `dcfeat predict --images` and through the server, "
            f"alternating, median of {len(t['rounds'])} rounds (`pipelines/bench_serve.py`):\n\n"
            + table(["what", "measured", "goal"], [
                ["`dcfeat serve`, 32 concurrent clients, one image per request",
                 f"{t['serve_requests_per_s']:.0f} requests/s", ""],
                ["`dcfeat predict --images` on the same photos, end to end (start-up and model load included)",
                 f"{t['predict_images_per_s']:.0f} images/s; after its start-up "
                 f"{t['predict_images_per_s_after_start']:.0f} images/s", ""],
                ["serve ÷ predict", f"**{t['ratio']:.2f}** end to end; **{t['ratio_after_start']:.2f}** after "
                 "predict's start-up", "≥ 0.8"],
                [f"soak: {soak['requests']:,} requests, 32 clients",
                 f"{soak['errors']} errors, {soak['lost']} lost, {soak['requests_per_s']:.0f} requests/s, "
                 f"p50 {soak['p50_ms']:.0f} ms, p99 {soak['p99_ms']:.0f} ms, "
                 f"{soak['batches']['mean_batch']:.1f} images per forward pass", "0 errors, 0 lost"],
                ["server RSS over the soak (after a 500-request warm-up)",
                 f"{soak['rss_before_mb']:.0f} → {soak['rss_after_mb']:.0f} MB: **{soak['rss_growth_mb']:+.1f} MB**",
                 "≤ 50 MB"]])
            + "\n\nThe server outpaces `predict` here because it runs the model with one torch thread (`--threads`, "
            "default half the cores) beside its decoding threads, where `predict` runs torch's default two against "
            "its decoding workers: on a busy 2-core machine the two OpenMP threads spin against everything else and a "
            "batch of the tiny model takes several times longer (measured: 15 ms with one thread, 58-680 ms with two). "
            "A larger model on an idle machine would narrow the gap; the soak's 0 errors, 0 lost and the RSS hold "
            "either way."
            + "\n\nHostile requests, each followed by a good one"
            + (" (every case got its documented status, and the server answered after each)" if ok else "")
            + ":\n\n" + table(["case", "status wanted", "status got", "answering after"], hostile))


def worlds(path: Path) -> str:
    """Quality per city of the synthetic family and the goals, met or not (pipelines/bench_worlds.py)."""
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_worlds.py`."
    w = json.loads(path.read_text())
    cities = w["cities"]
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731

    def row(name, c):
        m, conf = c["methods"], c["confidence"]
        knob = ", ".join(f"{k}={v}" for k, v in c["city"].items()) or "default"
        return [f"{name} ({knob})", f"{c['train_rows']:,} / {c['classes']}", pct(m["classify"]["lr1"]),
                pct(m["classify-centre"]["lr1"]), pct(m["retrieve"]["lr1"]),
                f"{pct(m['hybrid']['lr1'])} ({100 * m['hybrid']['candidate_share']:.2f} %)",
                pct(m["adaptive"]["lr1"]), f"{conf['ece']:.3f}", pct(conf["lr1_most_confident_half"]),
                f"{pct(conf['radius_90_inside'])} ({conf['radius_90_median_m']:.0f} m)",
                f"{c['position']['radius_m']:g} m, T {c['position']['temperature']:g}; q {c['gate']['mass']:g}"]

    rows = [row(n, c) for n, c in cities.items()]
    mean = lambda f: sum(f(c) for c in cities.values()) / len(cities)  # noqa: E731
    rows.append(["**mean**", "", *(f"**{pct(mean(lambda c, m=m: c['methods'][m]['lr1']))}**"
                                    for m in ("classify", "classify-centre", "retrieve", "hybrid", "adaptive")),
                 f"**{mean(lambda c: c['confidence']['ece']):.3f}**",
                 f"**{pct(mean(lambda c: c['confidence']['lr1_most_confident_half']))}**",
                 f"**{pct(mean(lambda c: c['confidence']['radius_90_inside']))}**", ""])
    per_city = table(["city", "train rows / classes", "position LR@1", "cell centre", "retrieval",
                      "gated hybrid (share of DB)", "adaptive", "ECE", "LR@1 confident half", "90 % radius holds",
                      "fitted on val: rule; gate"], rows)

    def verdict(ok: bool) -> str:
        return "met" if ok else "**missed**"

    ranked, ranked_ok = ranked_answers(w)
    m = {n: c["methods"] for n, c in cities.items()}
    gain = mean(lambda c: c["methods"]["classify"]["lr1"] - c["methods"]["classify-centre"]["lr1"])
    beat = [n for n in cities if m[n]["classify"]["lr1"] >= m[n]["retrieve"]["lr1"]]
    hyb = [n for n in cities if m[n]["hybrid"]["lr1"] >= m[n]["retrieve"]["lr1"] + 0.01
           and m[n]["hybrid"]["candidate_share"] <= 0.05]
    ece = [n for n in cities if cities[n]["confidence"]["ece"] <= 0.03]
    half = mean(lambda c: c["confidence"]["lr1_most_confident_half"])
    radius = [n for n in cities if 0.88 <= cities[n]["confidence"]["radius_90_inside"] <= 0.92]
    n = len(cities)
    goals = table(["goal", "measured", ""], [
        ["position LR@1 ≥ exact retrieval's, every city", f"{len(beat)} of {n} cities", verdict(len(beat) == n)],
        ["position LR@k ≥ cell centre's − 0.5 points, k = 1, 5, 10, 20, every city",
         f"{len(ranked_ok)} of {n} cities", verdict(len(ranked_ok) == n)],
        ["position LR@1 ≥ cell centre's + 3 points, on average", f"+{100 * gain:.1f} points", verdict(gain >= 0.03)],
        ["gated hybrid ≥ retrieval + 1 point at ≤ 5 % of the database, every city", f"{len(hyb)} of {n} cities",
         verdict(len(hyb) == n)],
        ["ECE ≤ 0.03, every city", f"{len(ece)} of {n} cities", verdict(len(ece) == n)],
        ["LR@1 of the most confident half ≥ 90 %, on average", f"{pct(half)} %", verdict(half >= 0.9)],
        ["90 % radius holds 88–92 %, every city", f"{len(radius)} of {n} cities", verdict(len(radius) == n)]])
    return (f"On {machine(w)}{measured(w)}: per city {w['queries']:,} test and {w['val_queries']:,} val queries, "
            "default `TrainConfig`, the position rule, confidence and gate fitted on val against the database "
            "(`pipelines/bench_worlds.py`).\n\n" + per_city + "\n\n" + ranked + "\n\n" + goals)


def machine(w: dict) -> str:
    """Where a worlds run was measured, as recorded with it."""
    if "machine" not in w:
        return "this 2-core CPU"
    mc = w["machine"]
    load = f" (shared: 1-minute load {mc['load_before']:.1f} at the start)" if "load_before" in mc else ""
    return f"{mc['cores']} cores of an {mc['cpu']}{load}"


def ranked_answers(w: dict) -> tuple[str, list[str]]:
    """LR@1/5/10/20 of the position's ranked answers against the cell centres' per city, and of the rule before
    ranked answers measured in the same run; and the cities within 0.5 points of the centres at every k."""
    ks = (1, 5, 10, 20)
    rows, ok = [], []
    for name, c in w["cities"].items():
        pos, centre, old = c["methods"]["classify"], c["methods"]["classify-centre"], c.get("old_rule", {})
        if all(pos[f"lr{k}"] >= centre[f"lr{k}"] - 0.005 - 1e-9 for k in ks):
            ok.append(name)
        rows.append([name, *(f"{100 * pos[f'lr{k}']:.1f} / {100 * centre[f'lr{k}']:.1f} "
                             f"({100 * (pos[f'lr{k}'] - centre[f'lr{k}']):+.1f})" for k in ks),
                     " / ".join(f"{100 * old[f'lr{k}']:.1f}" if f"lr{k}" in old else "–" for k in ks)])
    return ("Ranked answers, position / cell centre (difference in points), the same test queries; the last column "
            "is the rule before ranked answers on the same run, whose ranks 2..k were pulled onto the rank-1 "
            "centroid:\n\n" + table(["city", "LR@1", "LR@5", "LR@10", "LR@20", "old rule LR@1/5/10/20"], rows)), ok


def serve_hostile(path: Path) -> str:
    """`/health` under slow and maximal clients, and RSS under 128 maximal requests (pipelines/bench_serve_hostile.py)."""
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_serve_hostile.py`."
    h = json.loads(path.read_text())
    med, p90, runs = h["health_median_ms"], h["health_p90_ms"], h["runs"]
    said = {"idle": "idle", "slowloris": "130 connections sending one header line every 2 s (slowloris)",
            "geopose_in_flight": f"maximal GeoPose requests ({h['geopose_body_bytes'] / 1e6:.1f} MB) back to back",
            "png_in_flight": "maximal PNG requests (8000² RGB) back to back"}
    rows = [[what, f"**{med[k]:.1f} ms**", f"{p90[k]:.1f} ms", "< 100 ms" if k != "idle" else "—"]
            for k, what in said.items()]
    rss = [r["rss"] for r in runs]
    return (f"A random tiny DINOv2 at 56 px on this 2-core CPU{measured(h)}, loopback; median over {len(runs)} server "
            "lifetimes of the median `/health` latency (TCP connect included) while each load runs "
            "(`pipelines/bench_serve_hostile.py`):\n\n"
            + table(["while", "`/health` median", "p90", "goal"], rows)
            + f"\n\nEvery slow client was cut off with 408 at `--header-timeout`. Memory: {rss[0]['clients']} "
            f"concurrent maximal GeoPose requests, each retried after its 503 `busy` (about "
            f"{sorted(r['refused_503_then_retried'] for r in rss)[len(rss) // 2]} refusals), all answered 200; peak RSS "
            f"**{h['rss_hwm_mb'] / 1024:.2f} GB** against {h['rss_before_mb'] / 1024:.2f} GB before the load. The bound "
            "is the base + 2 × `--max-inflight-mb` + `--max-decode-mb` (about 1.5 GiB with the defaults) whatever the "
            "number of connections; before these bounds, 128 × 3 copies of a 16 MB body could reach ~6 GB.")


def render(cpu: dict, results: Path) -> str:
    """BENCHMARKS.md from the CPU results and the other files recorded under `results`."""
    text = Template(TEMPLATE.read_text()).substitute(
        header=header(cpu), extraction=extraction(cpu), training=training(cpu), city=city(cpu),
        city_1m=city_1m(cpu), sweep=sweep(results / "sweep_train.jsonl"), finetune=finetune(results / "finetune.json"),
        fingerprint=fingerprint(results / "fingerprint.json"), scoring=scoring(results / "scoring.json"),
        crop=crop(results / "crop.json"), presets=presets(results / "presets.json"),
        negatives=negatives(results / "negatives.json"), confidence=confidence(results / "confidence.json"),
        hybrid_speed=hybrid_speed(results / "hybrid.json"), streamed=streamed(results / "streamed.json"),
        cli=cli(results / "cli.json"), worlds=worlds(results / "worlds.json"), serve=serve(results / "serve.json"),
        serve_hostile=serve_hostile(results / "serve_hostile.json"),
        gpu=gpu([(results / "gpu_h200.jsonl", ""), (results / "gpu_h200_second.jsonl", "run 2: ")]),
        gpu_h100=gpu([(results / "gpu_h100.jsonl", "")]),
        gpu_check=gpu_check(results / "gpu_h100_first.jsonl"))
    return text.rstrip("\n") + "\n"
