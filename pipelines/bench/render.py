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


def table(head: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


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
            f"{c['epochs']} epochs, default projection and head rates, one process per run{_measured(ft)}:\n\n{runs}"
            f"\n\nDisk per image for the cached tokens: {c['token_bytes_per_image']:,} B at this crop (the tokens "
            "entering block L − K have the same shape for every K; ViT-B/14 at 224: 257 × 768 × 2 B = 394,752 B)."
            f"\n\n{steps}\n\nViT-S/14 at 224, batch 32, CPU, median of 3 steps after a warm-up.")


def _measured(record: dict) -> str:
    return f", measured {record['date']}" if "date" in record else ", date not recorded"


def fingerprint(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_fingerprint.py`."
    fp = json.loads(path.read_text())
    secs = fp["fingerprint_s"]
    return (f"{fp['model']}, {fp['tensor_bytes'] / 1e6:,.0f} MB of tensors, {fp['device']} ({fp['cpu']}), median "
            f"of {fp['repeats']}{_measured(fp)} (`pipelines/bench_fingerprint.py`):\n\n"
            + table(["what", "measured"], [
                ["fingerprint of every tensor + the architecture, sha256 (the hash used)", f"{secs['sha256']:.2f} s"],
                ["the same with blake2b, for comparison", f"{secs['blake2b']:.2f} s"],
                ["`load_backbone` in full (fingerprint included)", f"{fp['load_backbone_s']:.2f} s"]]))


def _steps(path: Path) -> dict[str, list[dict]]:
    steps = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).append(row)
    return steps


def _gpu_rows(steps: dict, note: str = "") -> list[list[str]]:
    """One table row per figure a GPU run measured (whichever steps it ran), `note` prefixed."""
    rows = []
    if "decode_per_core" in steps:
        dec = steps["decode_per_core"][0]
        rows.append(["decode + preprocess, one core, 512² JPEG",
                     f"{dec['full']:.0f} img/s full, {dec['draft']:.0f} img/s draft", ""])
    if "extract_vitb14" in steps:
        ex = steps["extract_vitb14"][0]
        rows.append([f"extraction ViT-B/14, 224, bf16, batch {ex['batch_size']}, {ex['workers']} workers, "
                     f"{ex['images']:,} images",
                     (f"backbone only {ex['backbone_only_img_s']:,.0f} img/s; end to end {ex['end_to_end_img_s']:,.0f} "
                      f"img/s; ratio **{ex['ratio']:.2f}**"), "≥ 0.85 and ≥ 4000 img/s"])
    rows += [[f"cached training step, batch {s['batch_size']}, 768→512, {s['classes_per_group']:,} classes per group",
              (f"{s['step_ms']:.2f} ms ({s['step_tflops']:.0f} TFLOP/s); the same matmuls alone {s['mm_ms']:.2f} ms "
               f"({s['mm_tflops']:.0f} TFLOP/s); fraction **{s['fraction_of_mm']:.2f}**"), "≥ 0.5"]
             for s in steps.get("step", [])]
    rows += [[f"training epoch, {t['rows']:,} rows × 768, {t['classes']:,} classes, batch {t['batch_size']}",
              f"**{t['seconds_per_epoch']:.1f} s/epoch** ({t['samples_per_s']:,.0f} samples/s)", "≤ 5 s"]
             for t in steps.get("train", [])]
    for q in steps.get("queries", []):
        rows.append([f"{q['db_rows']:,}-row database, {q['queries']} queries, {q['classes']:,} classes",
                     (f"classify {q['classify_ms_per_query']:.4f} ms/query, retrieve {q['retrieve_ms_per_query']:.4f}, "
                      f"hybrid {q['hybrid_ms_per_query']:.4f}; classify **{q['retrieve_over_classify']:.1f}×** and "
                      f"hybrid **{q.get('retrieve_over_hybrid', 0):.1f}×** faster than retrieval"),
                     "classify ≥ 20×, hybrid ≥ 5×"])
    for loop in steps.get("backbone_in_loop", []):
        rows.append([f"training step with a ViT-S/14 forward per sample vs cached, batch {loop['batch_size']}",
                     (f"{loop['backbone_in_loop_samples_per_s']:,.0f} vs {loop['cached_samples_per_s']:,.0f} samples/s: "
                      f"**{loop['ratio']:.0f}×**"), "≥ 100×"])
    for quality in steps.get("quality", []):
        lr1 = {name: 100 * m["recall"]["1"] for name, m in quality["methods"].items()}
        rows.append(["synthetic city trained and evaluated on the GPU (bf16 logits), LR@1",
                     ", ".join(f"{name} {v:.1f}" for name, v in lr1.items()), "as the CPU run"])
    return [[f"{note}{r[0]}" if note else r[0], *r[1:]] for r in rows]


def gpu(runs: list[tuple[Path, str]]) -> str:
    """The GPU figures of one or more runs on one device: (jsonl path, note for its rows)."""
    first = _steps(runs[0][0])
    if not first:
        return f"No GPU run recorded yet: run `python pipelines/gpu_bench.py --out {runs[0][0]}` on a CUDA machine."
    env = first["env"][0]
    rows = [row for path, note in runs for row in _gpu_rows(_steps(path), note)]
    return (f"Device: {env['gpu']}, {env['cpus']} CPU cores, torch {env['torch']}, Python {env['python']} "
            f"({len(runs)} run(s) of `pipelines/gpu_bench.py`{_measured(env)}; each figure a median of 3 timed "
            "repeats after a warm-up). Backbones are randomly initialised DINOv2 architectures: speed only.\n\n"
            + table(["what", "measured", "goal"], rows))


def gpu_check(path: Path) -> str:
    check = _steps(path).get("check")
    if not check:
        return ""
    c = check[0]
    return (f"Correctness on the GPU (first run): bf16 ViT-B/14 embeddings vs fp32 CPU, relative error "
            f"{c['backbone_bf16_rel_err']:.4f}, lowest cosine {c['backbone_min_cosine']:.5f}; CUDA fp16 retrieval vs "
            f"CPU, top-1 agreement {c['retrieval_top1_agreement']:.3f}, top-10 set agreement "
            f"{c['retrieval_top10_set_agreement']:.4f}.")


def scoring(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_scoring.py`."
    sc = json.loads(path.read_text())
    rows = [[f"{method} ({name})", *recall_cells(m)]
            for name, methods in sc["scorings"].items() for method, m in methods.items()]
    return (f"`{sc['city']}`, one trained run (default `TrainConfig`), the same 500 test queries and database for "
            f"both rankings{_measured(sc)} (`pipelines/bench_scoring.py`):\n\n"
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
            f"consecutive runs{_measured(cr)} (`pipelines/bench_crop.py`):\n\n"
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
            f"{', '.join(map(str, pr['seeds']))}{_measured(pr)} (`pipelines/bench_presets.py`, one thread). Every "
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
    return (f"CPU, median of 3 steps after one that allocates AdamW's state{_measured(ng)} "
            "(`pipelines/bench_negatives.py`, timing `train.train_step`):\n\n" + table(["what", "measured", "goal"], rows))


def streamed(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_streamed.py`."
    st = json.loads(path.read_text())
    rows = [[f"{name.replace('_', ' ')} (`--memory-budget {r['budget']}`)", f"{r['samples_per_s']:,.0f}",
             f"{r['peak_rss_mb']:,.0f} MB", f"{100 * r['best_val_lr1']:.1f}"]
            for name, r in (("in_memory", st["in_memory"]), ("streamed", st["streamed"]))]
    return (f"`{st['city']}`: {st['rows']:,} train rows, {st['split_mb']:.0f} MB of float16 features; default "
            f"`TrainConfig`, each run its own `dcfeat train` process{_measured(st)} (`pipelines/bench_streamed.py`). "
            f"Streamed samples/s ÷ in-memory: **{st['samples_ratio']:.2f}** (goal ≥ 0.8); peak RSS within the "
            "budget + 1.5 GB (goal):\n\n" + table(["split", "samples/s", "peak RSS", "best val LR@1"], rows))


def confidence(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_confidence.py`."
    cf = json.loads(path.read_text())
    sec = cf["confidence"]
    sig = sec["signals"]
    fmt = lambda v, pct=False: "—" if v is None else (f"{100 * v:.1f}" if pct else f"{v:.3f}")  # noqa: E731
    rows = [[f"**{name}**" if name == "confidence" else name, fmt(m["auc_pr"]), fmt(m["auroc"]),
             *(fmt(m["lr1_at_coverage"][c], True) for c in ("50", "75", "90")), fmt(m["ece"]), fmt(m["brier"])]
            for name, m in sig.items()]
    singles = {n: m["auc_pr"] for n, m in sig.items() if not n.startswith("confidence")}
    best = max(singles, key=singles.get)
    kinds = [("confidence_without_database" if "confidence_without_database" in sig else "confidence",
              "confidence (no database)")]
    if "confidence_without_database" in sig:
        kinds.append(("confidence", "confidence with retrieval's agreement"))
    goals = []
    for name, label in kinds:
        c = sig[name]
        goals += [[f"ECE, {label}", f"{c['ece']:.3f}", "≤ 0.03"],
                  [f"AUC-PR, {label}", f"{c['auc_pr']:.3f} vs the best single signal ({best}) {singles[best]:.3f}: "
                   f"**{c['auc_pr'] - singles[best]:+.3f}**; softmax probability "
                   f"{sig['softmax_probability']['auc_pr']:.3f}", "≥ best single + 0.02, and above the softmax probability"],
                  [f"LR@1 among the 50 % most confident, {label}", f"{100 * c['lr1_at_coverage']['50']:.1f} %", "≥ 97 %"]]
    goals.append(["true position inside the 90 % radius", f"{100 * sec['radius_90']['inside']:.1f} % "
                  f"(median radius {sec['radius_90']['median_m']:.0f} m)", "88–92 %"])
    nm = cf.get("near_misses")
    misses = "" if not nm else (
        f"\n\nThe wrong answers among the 50 % most confident queries by the confidence without a database "
        f"({nm['wrong_in_top_half']} of "
        f"{nm['queries_in_top_half']:,}) are near misses: their errors' 10th, 50th and 90th percentiles are "
        + ", ".join(f"{v:.1f}" for v in nm["error_m_percentiles_10_50_90"]) + " m.")
    m = cf["methods"]
    modes = [[name, *(f"{100 * r['recall'][k]:.1f}" for k in ("1", "5", "20")), f"{r['median_error_m']:.1f} m",
              f"{r['mean_candidates']:,.0f}" if "mean_candidates" in r else "—"] for name, r in m.items()]
    return (f"`{cf['city']}`: default `TrainConfig`, calibrated on val ({cf['calibrator']['fitted_on']['queries']:,} "
            f"queries), measured on test ({cf['confidence']['right'] * 100:.1f} % right at 25 m){_measured(cf)} "
            "(`pipelines/bench_confidence.py`). Every signal ranks the same answers (classification's top 1); "
            "entropy and spread rank by their negation, `retrieval_disagreement_m` is the distance between "
            "classification's and retrieval's top 1 (a database is needed):\n\n"
            + table(["signal", "AUC-PR", "AUROC", "LR@1 at 50 %", "at 75 %", "at 90 %", "ECE", "Brier"], rows)
            + "\n\n" + table(["goal", "measured", "target"], goals) + misses
            + f"\n\nThe modes on the same queries, database {cf['database_rows']:,} rows:\n\n"
            + table(["mode", "LR@1", "LR@5", "LR@20", "median error", "mean candidates"], modes))


def hybrid_speed(path: Path) -> str:
    if not path.is_file():
        return "Not measured yet: run `python pipelines/bench_hybrid.py`."
    hb = json.loads(path.read_text())
    q = hb["queries"]
    rows = [[name, f"{q[name]['ms_per_query']:.4f}", f"{100 * q[name]['recall']['1']:.1f}",
             f"{q[name]['mean_candidates']:,.0f}" if "mean_candidates" in q[name] else "—"]
            for name in ("classify", "retrieve", "hybrid", "adaptive")]
    goals = [["hybrid ms/query ÷ classify ms/query", f"**{q['hybrid_over_classify']:.2f}**", "≤ 2"],
             ["hybrid vs exact retrieval", f"**{q['retrieve_over_hybrid']:.0f}×** faster", "≥ 10×"],
             ["adaptive hybrid vs exact retrieval", f"**{q['retrieve_over_adaptive']:.1f}×** faster, "
              f"{100 * q['adaptive_database_share']:.2f} % of the database scored per query, LR@1 "
              f"{100 * q['adaptive']['recall']['1']:.1f} vs {100 * q['retrieve']['recall']['1']:.1f}",
              "≥ 5×, ≤ 10 %, LR@1 ≥ retrieval's"]]
    fz = hb["faiss_comparison"]
    if "skipped" not in fz:
        goals.append([f"exact retrieval ÷ faiss {fz['faiss']} `IndexFlatIP`, {fz['rows']:,} × {fz['dim']}, "
                      f"{fz['queries']:,} queries, k = {fz['k']}",
                      f"dcfeat {fz['dcfeat_seconds']:.2f} s, faiss {fz['faiss_seconds']:.2f} s: "
                      f"**{fz['dcfeat_over_faiss_queries_per_s']:.2f}**; top-1 agreement {fz['top1_agreement']:.3f}", "≥ 1"])
    return (f"`{q['city']}`: {q['database_rows']:,}-row database, {q['queries']} queries, {q['classes']:,} classes, "
            f"a run of {q['train_epochs']} epochs calibrated on val; CPU, median of 3 after a warm-up, modes "
            f"interleaved{_measured(hb)} (`pipelines/bench_hybrid.py`):\n\n"
            + table(["mode", "ms/query", "LR@1", "mean candidates"], rows) + "\n\n"
            + table(["goal", "measured", "target"], goals))


def render(cpu: dict, results: Path) -> str:
    """BENCHMARKS.md from the CPU results and the other files recorded under `results`."""
    text = Template(TEMPLATE.read_text()).substitute(
        header=header(cpu), extraction=extraction(cpu), training=training(cpu), city=city(cpu),
        city_1m=city_1m(cpu), sweep=sweep(results / "sweep_train.jsonl"), finetune=finetune(results / "finetune.json"),
        fingerprint=fingerprint(results / "fingerprint.json"), scoring=scoring(results / "scoring.json"),
        crop=crop(results / "crop.json"), presets=presets(results / "presets.json"),
        negatives=negatives(results / "negatives.json"), confidence=confidence(results / "confidence.json"),
        hybrid_speed=hybrid_speed(results / "hybrid.json"), streamed=streamed(results / "streamed.json"),
        gpu=gpu([(results / "gpu_h200.jsonl", ""), (results / "gpu_h200_second.jsonl", "run 2: ")]),
        gpu_h100=gpu([(results / "gpu_h100.jsonl", "")]),
        gpu_check=gpu_check(results / "gpu_h100_first.jsonl"))
    return text.rstrip("\n") + "\n"
