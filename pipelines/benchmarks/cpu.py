"""The CPU measurements behind BENCHMARKS.md: decoding, extraction, training and query speed, and the synthetic
city's quality (about 15 minutes on 2 cores).

Inputs: none (JPEGs, feature cities and random DINOv2 architectures are generated). Output: the record, and the
plots of the city's evaluation in pipelines/results/city/ (the README shows one). Run from the repository root:
`python -m pipelines.benchmarks run cpu` (`make bench` runs it, then renders BENCHMARKS.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dcfeat.backbone import save_random_vit
from dcfeat.synthetic.features import make_city
from dcfeat.train import TrainConfig
from pipelines.benchmarks import speed
from pipelines.benchmarks.markdown import machine_load, not_measured, recall_cells, table
from pipelines.benchmarks.quality import city_benchmark
from pipelines.benchmarks.records import RESULTS, software

# cpu.json was first recorded without its date and software; these are the ones the
# BENCHMARKS.md written by that run stated.
FIRST_CPU_RUN = {"date": "2026-11-26", "env": {"dcfeat": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu",
                                               "numpy": "2.4.6", "h5py": "3.16.0", "hdf5": "2.0.0"}}


def measure() -> dict:
    """Every CPU figure of BENCHMARKS.md, with the software that measured them."""
    out = {"env": software()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = speed.make_jpegs(tmp / "jpegs", 256)
        out["decode"] = speed.bench_decode(paths)
        vits = save_random_vit("vits14", tmp / "vits14")
        out["extract"] = speed.bench_extraction(vits, paths[:96], batch_size=32, device="cpu", workers=2, repeats=3)
    out["train_200k"] = speed.bench_train(200_000, 768, 10_000, batch_size=256, epochs=3)
    out["step"] = speed.bench_step(batch_size=256, in_dim=768, classes_per_group=2_500)
    out["backbone_in_loop"] = speed.bench_backbone_in_loop(batch_size=32, classes_per_group=2_500)
    out["city"] = city_benchmark(make_city(seed=0), TrainConfig(), plots_dir=RESULTS / "city")
    out["city_1m"] = city_benchmark(make_city(seed=0, streets=40, db_spacing_m=1.0), TrainConfig())
    return out


def render(results: list[dict]) -> dict[str, str]:
    """The header and the CPU sections, from the latest CPU record."""
    if not results:
        return dict.fromkeys(("header", "extraction", "training", "city", "city_1m"), not_measured("cpu"))
    cpu = results[-1]
    return {"header": header(cpu), "extraction": extraction(cpu), "training": training(cpu), "city": city(cpu),
            "city_1m": city_1m(cpu)}


def _versions(env: dict) -> str:
    return (f"dcfeat {env['dcfeat']}, Python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, "
            f"h5py {env['h5py']} (HDF5 {env['hdf5']})")


def header(cpu: dict) -> str:
    cpu = {**FIRST_CPU_RUN, **cpu}
    return (f"CPU figures measured {cpu['date']} with {_versions(cpu['env'])}{machine_load(cpu)}. Every section is rendered by "
            "`python -m pipelines.benchmarks render` from the results recorded in `pipelines/results/`, each with its own date "
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
            f"retrieval in the learned space and **{over['raw']:.0f}×** faster than on raw features (goal ≥ 20×)"
            + (f", with its position; the cell centre alone, {centre:.0f}× faster than retrieval in the learned space."
               if (centre := _centre_over(m)) else "."))


def _centre_over(m: dict) -> float | None:
    """Exact retrieval's ms per query over classify-centre's (None: a record from before that mode)."""
    centre = next((v for k, v in m.items() if k.startswith("classify-centre")), None)
    return m["retrieve (projected)"]["ms_per_query"] / centre["ms_per_query"] if centre else None
