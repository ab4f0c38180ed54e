"""BENCHMARKS.md's GPU sections, from the JSON lines of `pipelines/gpu_bench.py` runs."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.bench.markdown import measured, table


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
            f"({len(runs)} run(s) of `pipelines/gpu_bench.py`{measured(env)}; each figure a median of 3 timed "
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
