"""The run report's inputs, read out of the artifact store, and ``report.html`` written next to ``report.json``.

The evaluated versions are the ones the report names (``model_version``, ``sids_version``), not whatever is
published now: the training curves and SID statistics on the page are those of the model and SIDs that were
evaluated. ``rebuild_html_report`` re-renders the page of a published evaluation without running anything.
"""

from __future__ import annotations

import pyarrow.fs as pafs

from sidrec.eval.html_report import ReportInputs, render_html
from sidrec.eval.published import published_for_format
from sidrec.store import ArtifactStore, resolve_fs

REPORT_HTML = "report.html"
# the stages an evaluation depends on, in pipeline order (their manifests' configs are its provenance)
LINEAGE = ("dataset", "embeddings", "quantizer", "sids", "instructions", "base_model", "model")


class NoEvaluationError(FileNotFoundError):
    """The store has no published evaluation of the split asked for."""


def _is_file(store: ArtifactStore, path: str) -> bool:
    return store.fs.get_file_info(path).type == pafs.FileType.File


def _version_json(store: ArtifactStore, stage: str, version: str | None, name: str, notes: list[str]) -> dict | None:
    """``<stage>/<version>/<name>`` of the store, or None (with a note) when it is not there."""
    if not version:
        notes.append(f"The report names no {stage} version: its {name} is not shown.")
        return None
    path = f"{store.stage_dir(stage)}/{version}/{name}"
    if not _is_file(store, path):
        notes.append(f"{stage} version {version} has no {name} in the store (pruned?): not shown.")
        return None
    return store.read_json(path)


def _rebuilt_since(stage: str, evaluated: str | None, manifest: dict | None) -> str | None:
    if manifest is None or evaluated is None or manifest.get("version") == evaluated:
        return None
    return (f"The {stage} stage was rebuilt after this evaluation (published now: {manifest.get('version')}); "
            f"this page shows the evaluated version {evaluated}.")


def report_inputs(store: ArtifactStore, report: dict, eval_stage: dict) -> ReportInputs:
    """Everything the page shows about ``report`` (an eval stage's report.json; ``eval_stage``: its manifest)."""
    notes: list[str] = []
    manifests = {stage: m for stage in LINEAGE if (m := store.manifest(stage)) is not None}
    training = _version_json(store, "model", report.get("model_version"), "metrics.json", notes)
    sids = _version_json(store, "sids", report.get("sids_version"), "report.json", notes)
    sids_manifest = manifests.get("sids")
    if sids is None and sids_manifest is not None and sids_manifest.get("version") == report.get("sids_version"):
        sids = {"summary": sids_manifest.get("metrics") or {}}  # the manifest carries the summary too
    for stage, key in (("model", "model_version"), ("sids", "sids_version")):
        if note := _rebuilt_since(stage, report.get(key), manifests.get(stage)):
            notes.append(note)
    data_format = ((report.get("config") or {}).get("data") or {}).get("format")
    if data_format is None:
        data_format = ((manifests.get("dataset") or {}).get("config") or {}).get("format")
    return ReportInputs(
        report=report, store_root=str(store.root), eval_stage=eval_stage, training=training, sids=sids,
        stage_configs={s: {"version": m.get("version"), "config": m.get("config")} for s, m in manifests.items()},
        published=published_for_format(data_format), notes=notes,
    )


def _eval_manifest(store: ArtifactStore, split: str) -> dict:
    stage = f"eval_{split}"
    manifest = store.manifest(stage)
    if manifest is None:
        built = [s for s in LINEAGE if store.manifest(s) is not None]
        raise NoEvaluationError(
            f"artifact store {store.root!r} has no evaluation of the {split!r} split yet (stage {stage} not "
            f"built; built: {', '.join(built) or 'nothing'}); run `sidrec eval` with this config first")
    return manifest


def write_html_report(store: ArtifactStore, folder: str, inputs: ReportInputs) -> str:
    """Render ``inputs`` into ``<folder>/report.html``; its path."""
    path = f"{folder}/{REPORT_HTML}"
    store.write_bytes(path, render_html(inputs).encode("utf-8"))
    return path


def open_existing_store(root: str) -> ArtifactStore:
    """The store at ``root``, which must exist already (``ArtifactStore`` would create an empty one)."""
    fs, path = resolve_fs(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise NoEvaluationError(f"no artifact store at {root!r}: nothing has been built with this config yet; "
                                "run `sidrec eval` with it first")
    return ArtifactStore(root)


def rebuild_html_report(root: str, split: str) -> str:
    """Re-render the published ``eval_<split>`` stage's report.html from the store (nothing is rerun); its path."""
    store = open_existing_store(root)
    manifest = _eval_manifest(store, split)
    folder = f"{store.stage_dir(manifest['stage'])}/{manifest['version']}"
    report = store.read_json(f"{folder}/report.json")
    return write_html_report(store, folder, report_inputs(store, report, manifest))


def html_report_path(root: str, split: str) -> str:
    """The published evaluation's report.html, rendered first if that version has none (an older run)."""
    store = open_existing_store(root)
    manifest = _eval_manifest(store, split)
    path = f"{store.stage_dir(manifest['stage'])}/{manifest['version']}/{REPORT_HTML}"
    return path if _is_file(store, path) else rebuild_html_report(root, split)
