"""`dcfeat export RUN DIR`: a run folder as a shareable model: its files, a model card, ready for `hf upload`.

DIR holds the run's files as `dcfeat train` wrote them (config.json, classes.parquet,
model.safetensors, blocks.safetensors and calibration.json where the run has them,
checksums.json, command.txt, train_log.jsonl), each evaluation's report.json and plots
(eval/<split>/, without the per-query predictions.parquet), and a README.md: a model card
with a YAML header (Hugging Face's model card metadata) that says what the run is — backbone
id and fingerprint, training command, classes, the split its confidence was fitted on, the
metrics of every report.json — and its limits. `Localizer.from_run(DIR)` and `dcfeat serve
--run DIR` load DIR as it is. `--with-backbone` also copies a local backbone checkpoint
(config.json and safetensors) into DIR/backbone/, which the Localizer then loads.

The run is checked before anything is written (`load_run` and its checksums); DIR is built
under a temporary name and renamed into place, so it is never half written.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dcfeat import __version__
from dcfeat.atomic import tmp_path
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.choices import THRESHOLD_M
from dcfeat.errors import BadInput, writing
from dcfeat.hub import is_hub
from dcfeat.localizer import BACKBONE_DIR
from dcfeat.reports import REPORT
from dcfeat.run import (
    BLOCKS_FILE,
    CALIBRATION_FILE,
    CHECKSUM_FILE,
    COMMAND_FILE,
    EVAL_DIR,
    LOG_FILE,
    RUN_FILES,
    Run,
    load_run,
    verify_checksums,
)

CARD = "README.md"
COPIED = (*RUN_FILES, BLOCKS_FILE, CALIBRATION_FILE, CHECKSUM_FILE, COMMAND_FILE, LOG_FILE)
EVAL_SUFFIXES = (".json", ".png")  # of eval/<split>/: the reports and plots, not predictions.parquet


@dataclass
class Export:
    directory: Path
    files: list[str]  # paths relative to `directory`
    reports: list[str]  # the splits whose report.json the card quotes
    run: Run


def _reports(run_dir: Path) -> dict[str, dict]:
    """split → its report.json, for every evaluation of the run that can be read."""
    found = {}
    for path in sorted((run_dir / EVAL_DIR).glob(f"*/{REPORT}")):
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return found


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def metrics_table(reports: dict[str, dict]) -> str:
    rows = ["| split | method | queries | LR@1 | LR@5 | LR@10 | LR@20 | median error |", "|---|---|---|---|---|---|---|---|"]
    for split, report in reports.items():
        for method, m in report.get("methods", {}).items():
            recall = m.get("recall", {})
            median = m.get("median_error_m")
            rows.append(f"| {split} | {method} | {report.get('queries', '—')} | "
                        + " | ".join(_pct(recall.get(k)) for k in ("1", "5", "10", "20"))
                        + f" | {'—' if median is None else f'{median:.1f} m'} |")
    return "\n".join(rows)


def _yaml(value) -> str:
    return json.dumps(value)  # a JSON string or list is valid YAML, quoted and escaped


def model_card(run: Run, reports: dict[str, dict], *, with_backbone: bool) -> str:
    """README.md of the exported folder: Hugging Face model card metadata, then what the run is and its limits."""
    features, train, cal = run.feature_identity, run.config.train, run.calibration
    backbone = features.get("model") or "unknown"
    hub_id = backbone if "/" in backbone and not Path(backbone).is_absolute() and not is_hub(backbone) else None
    threshold = reports[next(iter(reports))].get("threshold_m", THRESHOLD_M) if reports else THRESHOLD_M
    header = ["---", "library_name: dcfeat", "pipeline_tag: image-classification",
              f"tags: {_yaml(['visual-place-recognition', 'geolocalization', 'divide-and-classify', 'dinov2'])}"]
    if hub_id and not run.random_backbone:
        header.append(f"base_model: {_yaml(hub_id)}")
    if reports:
        results = [{"task": {"type": "visual-place-recognition", "name": "Visual place recognition"},
                    "dataset": {"name": split, "type": "custom"},
                    "metrics": [{"type": f"recall@{k}", "name": f"{method} LR@{k} ({threshold:g} m)",
                                 "value": round(100 * m["recall"][k], 2)}
                                for method, m in r.get("methods", {}).items() for k in ("1", "5")
                                if m.get("recall", {}).get(k) is not None]}
                   for split, r in reports.items()]
        header.append(f"model-index: {_yaml([{'name': Path(run.directory).resolve().name, 'results': results}])}")
    header.append("---")
    command = (Path(run.directory) / COMMAND_FILE)
    command_text = command.read_text().strip() if command.is_file() else "(not recorded)"
    notices = []
    if run.random_backbone:
        notices.append(f"**{RANDOM_NOTICE}.** The backbone was randomly initialised: this run tests the pipeline "
                       "and says nothing about where photos were taken.")
    if not run.complete:
        notices.append(f"**INCOMPLETE RUN**: training stopped after epoch {run.epochs_done} of {run.epochs}.")
    if cal is None:
        notices.append("**UNCALIBRATED**: answers carry no confidence and no 90 % radius "
                       "(`dcfeat calibrate --run RUN --split val` fits them).")
    backbone_line = (f"`{backbone}` (fingerprint `{features.get('model_fingerprint', 'not recorded')}`), pooling "
                     f"`{features.get('pooling')}`, crop `{features.get('crop')}` at {features.get('image_size')} px")
    where = (f"copied into `{BACKBONE_DIR}/` (loaded from there)" if with_backbone else
             f"not included: `Localizer`/`dcfeat serve` load `{features.get('model_source') or backbone}`; where that "
             "path does not exist, pass `model=`/`--model` a copy of the same weights (the fingerprint is checked)")
    calibration = ("none" if cal is None else
                   f"fitted on split `{cal.fitted_on.get('split')}` ({cal.fitted_on.get('queries')} queries, "
                   f"{cal.fitted_on.get('right')} right) at {cal.threshold_m:g} m: `confidence` is the probability that "
                   f"an answer lies within {cal.threshold_m:g} m of where the photo was taken, `radius_m` holds the "
                   "true position with probability 0.9")
    lines = [
        *header, "",
        f"# {Path(run.directory).resolve().name}: a dcfeat run", "",
        *(n + "\n" for n in notices),
        "City-scale visual place recognition by classification (Divide&Classify, Trivigno et al., ICCV 2023) on "
        "cached frozen DINOv2/DINOv3 features, trained with dcfeat "
        f"{__version__}: a photo is placed in one of {run.classes.height:,} square cells of {run.M:g} m, and its "
        "answer is reported in UTM and latitude/longitude with the top-k cells and their probabilities.", "",
        "## Use", "",
        "```python", "from dcfeat import Localizer", "",
        'loc = Localizer.from_run("THIS_FOLDER", device="auto")',
        'for answer in loc.locate(["photo.jpg"]):',
        "    print(answer.lat, answer.lon, answer.confidence, answer.radius_m)",
        "```", "",
        "or over HTTP: `dcfeat serve --run THIS_FOLDER` (POST /v1/locate, OSCP GeoPose /scrs/geopose, a page at /).", "",
        "## What it is", "",
        "| | |", "|---|---|",
        f"| backbone | {backbone_line} |",
        f"| backbone weights | {where} |",
        f"| cells | {run.classes.height:,} classes of side M = {run.M:g} m in {train.N ** 2} groups (N = {train.N}), "
        f"cells with at least {train.min_images_per_class} training images |",
        f"| classifier | preset `{train.preset}`, head `{train.head}` (s = {train.s:g}, m = {train.m:g}), projection to "
        f"{train.dim} dims, test prototypes `{train.test_prototypes}` |",
        f"| training | split `{run.config.train_split}` of `{run.config.store}`, {run.epochs_done} of {run.epochs} epochs, "
        f"epoch kept {run.config.best_epoch} |",
        f"| confidence | {calibration} |",
        f"| tuned backbone blocks | {run.finetune_blocks or 'none'} |", "",
        "Training command (`command.txt`):", "", "```", command_text, "```", "",
        "## Metrics", "",
        (f"From `{EVAL_DIR}/<split>/{REPORT}` (`dcfeat evaluate`): localisation recall LR@k in %, a query counting "
         f"when one of its top-k answers lies within {threshold:g} m." + (f" {RANDOM_NOTICE}." if run.random_backbone
                                                                          else "") + "\n\n" + metrics_table(reports))
        if reports else "Not evaluated: no `eval/*/report.json` in the run (`dcfeat evaluate --run RUN --split test`).",
        "",
        "## Limits", "",
        f"* Only places within the {run.classes.height:,} cells above can be answered right: a photo taken elsewhere "
        "gets the most similar known cell.",
        "* The answer is a position on the ground, in a cell of the training city; there is no orientation and no "
        "height (GeoPose answers say so: identity quaternion, `accuracy.orientation` 180, `h` 0).",
        "* The confidence holds for photos like those of its held-out split; photos of other cameras, seasons or "
        "cities can make it overconfident.",
        "* Answers need the same backbone weights (checked by fingerprint), pooling and crop as the training features.",
        "",
    ]
    return "\n".join(lines)


def _backbone_files(source: str) -> list[Path]:
    folder = Path(source)
    if not folder.is_dir():
        raise BadInput(f"--with-backbone: the run's backbone `{source}` is not a local folder; it loads by its hub "
                       "id, so export without --with-backbone")
    files = [p for p in folder.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name.endswith(".json"))]
    if not any(p.suffix == ".safetensors" for p in files):
        raise BadInput(f"--with-backbone: {folder} holds no safetensors weights")
    return files


def export_run(run_dir: Path, out: Path, *, with_backbone: bool = False) -> Export:
    """`dcfeat export`: check the run, copy it with its model card into `out` (a new folder)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} exists and is not an empty folder; an export never overwrites anything. Choose "
                       "another DIR")
    run = load_run(run_dir)  # refuses a damaged run, naming the file
    verify_checksums(run_dir)
    reports = _reports(run_dir)
    backbone = _backbone_files(run.feature_identity.get("model_source") or "") if with_backbone else []
    tmp = tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    files = []
    with writing(out.parent if out.parent.exists() else Path.cwd()):
        tmp.mkdir(parents=True)
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
                files.append(name)
        for split in reports:
            for path in sorted((run_dir / EVAL_DIR / split).iterdir()):
                if path.is_file() and path.suffix in EVAL_SUFFIXES:
                    (tmp / EVAL_DIR / split).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, tmp / EVAL_DIR / split / path.name)
                    files.append(f"{EVAL_DIR}/{split}/{path.name}")
        if backbone:
            (tmp / BACKBONE_DIR).mkdir()
            for path in backbone:
                shutil.copy2(path, tmp / BACKBONE_DIR / path.name)
                files.append(f"{BACKBONE_DIR}/{path.name}")
        (tmp / CARD).write_text(model_card(run, reports, with_backbone=bool(backbone)), encoding="utf-8")
        files.append(CARD)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    return Export(directory=out, files=files, reports=list(reports), run=run)
