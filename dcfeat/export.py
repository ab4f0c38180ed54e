"""`dcfeat export RUN DIR`: a run folder as a shareable model: its files, a model card, ready for `hf upload`.

DIR holds the run's files as `dcfeat train` wrote them (config.json, classes.parquet,
model.safetensors, blocks.safetensors and calibration.json where the run has them,
checksums.json, command.txt, train_log.jsonl), each evaluation's report.json and plots
(eval/<split>/, without the per-query predictions.parquet), and a README.md: a model card
with a YAML header (Hugging Face's model card metadata: license, dataset) that says what the
run is — backbone id and fingerprint, how the features were made, training command, classes
and the area their cells cover, the split its confidence was fitted on, the metrics of every
report.json — and its limits. `Localizer.from_run(DIR)` and `dcfeat serve --run DIR` load DIR
as it is (with `model=`/`--model` where the backbone was a local folder). `--with-backbone`
also copies a local backbone checkpoint (config.json and safetensors) into DIR/backbone/,
which the Localizer then loads.

DIR can be published: no file names a path of the machine that made it. Every absolute path
in the text and JSON files (the store, the images root, a local backbone folder, the run
folder, in config.json, calibration.json, report.json, command.txt) is replaced by its last
part, the file or folder name; checksums.json is updated for the files that changed.

The run is checked before anything is written (`load_run` and its checksums); DIR is built
under a temporary name and renamed into place, so it is never half written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from dcfeat import __version__
from dcfeat.atomic import CHECKSUM_FILE, record_checksum, tmp_dir
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.choices import THRESHOLD_M
from dcfeat.errors import BadInput, writing
from dcfeat.geo import utm_to_latlon
from dcfeat.hub import is_hub
from dcfeat.localizer import BACKBONE_DIR
from dcfeat.reports import REPORT
from dcfeat.run import (
    BLOCKS_FILE,
    CALIBRATION_FILE,
    CHECKSUMMED,
    COMMAND_FILE,
    EVAL_DIR,
    LOG_FILE,
    RUN_FILES,
    Run,
    load_run,
    verify_checksums,
)

CARD = "README.md"
# checksums.json first: a file made portable after it records its new checksum there.
COPIED = (CHECKSUM_FILE, *RUN_FILES, BLOCKS_FILE, CALIBRATION_FILE, COMMAND_FILE, LOG_FILE)
EVAL_SUFFIXES = (".json", ".png")  # of eval/<split>/: the reports and plots, not predictions.parquet
TEXT_SUFFIXES = (".json", ".jsonl", ".txt")  # files whose absolute paths are made portable
# An absolute POSIX path of two parts or more, up to a quote, space or separator: "/home/me/f.h5" but not
# "facebook/dinov2-base", "1/2" or "/v1": a slash after a word, dot or tilde does not start one.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[^\s\"'`|,;()\[\]{}<>/]+(?:/[^\s\"'`|,;()\[\]{}<>/]*)+")
# SPDX license ids (and Hugging Face's, lower case): letters, digits, dot, hyphen, plus.
_LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")
NAME_MAX = 200  # characters of --dataset-name
_MARKDOWN = re.compile(r"([\\`*_\[\]<>|#])")


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


def portable(text: str) -> str:
    """`text` with every absolute path replaced by its last part (the file or folder name)."""
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name, text)


def check_card_options(license: str | None, dataset_name: str | None) -> None:
    """Refuse a --license that is not an SPDX id and a --dataset-name that would break the card (a
    control character such as a newline, or too long); anything else is escaped where it is written."""
    if license is not None and not _LICENSE.fullmatch(license):
        raise BadInput(f"--license {license!r}: pass one SPDX license id (letters, digits, '.', '-', '+'), e.g. "
                       "apache-2.0, mit, cc-by-4.0, cc-by-nc-4.0, or `other` for a license of your own "
                       "(https://huggingface.co/docs/hub/repositories-licenses)")
    if dataset_name is not None and (not dataset_name.strip() or len(dataset_name) > NAME_MAX
                                     or any(not c.isprintable() for c in dataset_name)):
        raise BadInput(f"--dataset-name {dataset_name!r}: pass a name of 1 to {NAME_MAX} printable characters on "
                       "one line (a Hugging Face dataset id such as `owner/name`, or the data set's name)")


def _markdown(text: str) -> str:
    return _MARKDOWN.sub(r"\\\1", text)


def extent(classes: pl.DataFrame) -> dict:
    """The bounding box (degrees) of the classes' cell centres, each converted in its own UTM zone."""
    lat, lon = utm_to_latlon(classes["cell_east"].to_numpy(), classes["cell_north"].to_numpy(),
                             classes["utm_zone"].to_numpy(), classes["utm_letter"].to_numpy())
    return {"lat_min": float(np.min(lat)), "lat_max": float(np.max(lat)), "lon_min": float(np.min(lon)),
            "lon_max": float(np.max(lon))}


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


def model_card(run: Run, reports: dict[str, dict], *, with_backbone: bool, license: str | None = None,
               dataset_name: str | None = None) -> str:
    """README.md of the exported folder: Hugging Face model card metadata, then what the run is and its limits.
    Names only, no path of this machine (`portable`)."""
    features, train, cal = run.feature_identity, run.config.train, run.calibration
    backbone = portable(features.model or "unknown")
    hub_id = backbone if "/" in backbone and not Path(backbone).is_absolute() and not is_hub(backbone) else None
    threshold = reports[next(iter(reports))].get("threshold_m", THRESHOLD_M) if reports else THRESHOLD_M
    header = ["---", "library_name: dcfeat", "pipeline_tag: image-classification",
              f"tags: {_yaml(['visual-place-recognition', 'geolocalization', 'divide-and-classify', 'dinov2'])}"]
    if license:
        header.append(f"license: {_yaml(license.lower())}")
    if dataset_name:
        header.append(f"datasets: {_yaml([dataset_name])}")
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
    command_text = portable(command.read_text().strip()) if command.is_file() else "(not recorded)"
    notices = []
    if run.random_backbone:
        notices.append(f"**{RANDOM_NOTICE}.** The backbone was randomly initialised: this run tests the pipeline "
                       "and says nothing about where photos were taken.")
    if not run.complete:
        notices.append(f"**INCOMPLETE RUN**: training stopped after epoch {run.epochs_done} of {run.epochs}.")
    if cal is None:
        notices.append("**UNCALIBRATED**: answers carry no confidence and no 90 % radius "
                       "(`dcfeat calibrate --run RUN --split val` fits them).")
    def recorded(key: str) -> str:
        value = getattr(features, key)
        return "not recorded" if value is None else f"`{portable(str(value))}`"

    backbone_line = f"`{backbone}` (fingerprint `{features.model_fingerprint or 'not recorded'}`)"
    made = (f"images of the folder {recorded('images_root')}, crop {recorded('crop')} at {recorded('image_size')} "
            f"px, backbone `{backbone}`, pooling {recorded('pooling')}, stored as {recorded('dtype')}")
    where = (f"copied into `{BACKBONE_DIR}/` (loaded from there)" if with_backbone else
             f"not included: `Localizer`/`dcfeat serve` load `{portable(features.model_source or backbone)}`; "
             "where that is not a hub id or a folder at hand, pass `model=`/`--model` a copy of the same weights (the "
             "fingerprint is checked)")
    box = extent(run.classes)
    area = (f"cell centres within latitude {box['lat_min']:.5f} to {box['lat_max']:.5f}, longitude "
            f"{box['lon_min']:.5f} to {box['lon_max']:.5f} (WGS 84), {run.classes.height:,} cells")
    calibration = ("none" if cal is None else
                   f"fitted on split `{cal.fitted_on.split}` ({cal.fitted_on.queries} queries, "
                   f"{cal.fitted_on.right} right) at {cal.threshold_m:g} m: `confidence` is the probability that "
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
        f"| data set | {_markdown(dataset_name) if dataset_name else 'not named (`dcfeat export --dataset-name`)'} |",
        f"| license | {f'`{license.lower()}`' if license else 'not stated (`dcfeat export --license`)'} |",
        f"| extent | {area} |",
        f"| backbone | {backbone_line} |",
        f"| features | {made} |",
        f"| backbone weights | {where} |",
        f"| cells | {run.classes.height:,} classes of side M = {run.M:g} m in {train.N ** 2} groups (N = {train.N}), "
        f"cells with at least {train.min_images_per_class} training images |",
        f"| classifier | preset `{train.preset}`, head `{train.head}` (s = {train.s:g}, m = {train.m:g}), projection to "
        f"{train.dim} dims, test prototypes `{train.test_prototypes}` |",
        f"| training | split `{run.config.train_split}` of `{portable(str(run.config.store))}`, {run.epochs_done} of "
        f"{run.epochs} epochs, "
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


def _copy(source: Path, target: Path) -> None:
    """Copy a run file; a text or JSON one with its absolute paths made portable (its checksum recorded anew)."""
    if source.suffix not in TEXT_SUFFIXES:
        shutil.copy2(source, target)
        return
    text = source.read_text(encoding="utf-8")
    shutil.copy2(source, target)
    if portable(text) != text:
        target.write_text(portable(text), encoding="utf-8")
        if target.name in CHECKSUMMED:
            record_checksum(target)


def export_run(run_dir: Path, out: Path, *, with_backbone: bool = False, license: str | None = None,
               dataset_name: str | None = None) -> Export:
    """`dcfeat export`: check the run, copy it with its model card into `out` (a new folder, or an empty one).

    The copy is staged in a folder of this export's own beside `out` (`atomic.tmp_dir`) and renamed into
    place when complete; a failure removes that folder and nothing else (a folder dcfeat did not make is
    never deleted). `out` may not be a symbolic link: renaming onto it would replace the link, not fill
    its target, so it is refused naming the target to pass instead.
    `license`: an SPDX id for the card's metadata; `dataset_name`: the data set the run was trained on."""
    check_card_options(license, dataset_name)
    run_dir, out = Path(run_dir), Path(out)
    if out.is_symlink():
        target = Path(os.path.realpath(out))
        raise BadInput(f"{out} is a symbolic link to {target}; an export writes a new folder and never replaces a "
                       f"link. Export into the target itself (`dcfeat export RUN {target}`), or remove the link")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out} exists and is not an empty folder; an export never overwrites anything. Choose "
                       "another DIR")
    run = load_run(run_dir)  # refuses a damaged run, naming the file
    verify_checksums(run_dir)
    reports = _reports(run_dir)
    backbone = _backbone_files(run.feature_identity.model_source or "") if with_backbone else []
    files = []
    with writing(out.parent if out.parent.exists() else Path.cwd()):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir(out)
        try:
            _fill(tmp, run_dir, run, reports, backbone, files, license=license, dataset_name=dataset_name)
            tmp.replace(out)  # onto an empty folder too: POSIX renames a folder over an empty one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Export(directory=out, files=files, reports=list(reports), run=run)


def _fill(tmp: Path, run_dir: Path, run: Run, reports: dict[str, dict], backbone: list[Path], files: list[str], *,
          license: str | None, dataset_name: str | None) -> None:
    """Copy the run's files, its reports, its backbone and its card into the staging folder `tmp`, listing each."""
    for name in COPIED:
        if (run_dir / name).is_file():
            _copy(run_dir / name, tmp / name)
            files.append(name)
    for split in reports:
        for path in sorted((run_dir / EVAL_DIR / split).iterdir()):
            if path.is_file() and path.suffix in EVAL_SUFFIXES:
                (tmp / EVAL_DIR / split).mkdir(parents=True, exist_ok=True)
                _copy(path, tmp / EVAL_DIR / split / path.name)
                files.append(f"{EVAL_DIR}/{split}/{path.name}")
    if backbone:
        (tmp / BACKBONE_DIR).mkdir()
        for path in backbone:
            shutil.copy2(path, tmp / BACKBONE_DIR / path.name)
            files.append(f"{BACKBONE_DIR}/{path.name}")
    (tmp / CARD).write_text(model_card(run, reports, with_backbone=bool(backbone), license=license,
                                       dataset_name=dataset_name), encoding="utf-8")
    files.append(CARD)
