"""Stage 4: the synthetic set and the real splits in; realism, privacy and utility figures, a verdict and a report out.

This module is the wiring: the instruments (encoder features, segmenters, the membership attack)
live in :mod:`medsynth.evaluation.instruments`, the figures in :mod:`medsynth.evaluation.audit`.
The audit names what it audited: before any work it checks that the synthetic folder holds exactly
the files ``synthetic/manifest.csv`` lists with their recorded SHA-256
(:func:`medsynth.evaluation.provenance.check_synthetic_folder`), that the generator is the one the
manifest names with the same SHA-256, and that ``data/manifest.json`` is the dataset it was trained
on; ``metrics.json`` records every hash it verified (``provenance``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.compute import resolve_precision
from medsynth.config.schema import to_mapping
from medsynth.config.settings import EncoderSettings, EvaluateSettings, PrivacySettings, RunSettings
from medsynth.data import Manifest, load_split, read_manifest
from medsynth.data.manifest import require_records
from medsynth.diffusion.generator import Generator
from medsynth.evaluation import AuditSet, privacy_figures, realism_figures, render_report, utility_figures
from medsynth.evaluation.audit import not_computable
from medsynth.evaluation.figures import Figure, Verdict, judge
from medsynth.evaluation.instruments import (
    attack_sample,
    dataset_encoder,
    features,
    holdout_dice,
    membership_errors,
    train_segmenters,
)
from medsynth.evaluation.pictures import picture_sheets
from medsynth.evaluation.provenance import (
    LINEAGE,
    Custody,
    check_synthetic_folder,
    checkpoint_facts,
    preprocess_run_id,
    provenance_record,
    shared_value,
)
from medsynth.evaluation.rules import PrivacyRules, calibrate_rules
from medsynth.evaluation.synthetic import SyntheticSet, read_synthetic
from medsynth.io import write_json, write_text
from medsynth.metrics import label_intensity_stats
from medsynth.stages.context import pick_device, stage_run
from medsynth.tracking import TrackerLike
from medsynth.training import file_sha256
from medsynth.training.privacy import PrivacyRecord, checkpoint_privacy
from medsynth.training.segmenter import segment

log = logging.getLogger("medsynth")


def evaluate(
    *,
    settings: EvaluateSettings,
    encoder: EncoderSettings,
    privacy: PrivacySettings,
    run: RunSettings,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Audit the synthetic set listed in ``synthetic/manifest.csv`` against the real splits.

    Writes ``evaluation/metrics.json`` (every figure with its meaning and reference, the verdict
    of each group (privacy, realism, utility) with its limits, and the privacy rules applied),
    ``evaluation/report.html`` and, for 2D sets, picture sheets; logs them to MLflow with the
    figures as metrics and the verdicts as tags. The description of the evaluate run, and of its
    pipeline run (what the MLflow UI shows first), states the verdict, its reasons and where the
    report is.

    Args:
        settings: The audit's settings (``conf/evaluate``).
        encoder: The dataset's feature encoder (``conf/encoder``).
        privacy: The per-sample privacy rules (``conf/privacy``), calibrated as generate's gate does.
        run: The shared settings: seed, device, progress, folders, MLflow.
        tracker: Tracker to log to (default: from ``run.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``evaluation/metrics.json``.

    Raises:
        MedsynthError: For a missing dataset or synthetic set, a synthetic set of another shape, a
            synthetic file that is missing, changed or not listed, a generator checkpoint that is
            missing or not the file the samples were made with, or a dataset manifest other than
            the one the generator was trained on (one line naming the file).
    """
    config = {"evaluate": to_mapping(settings), "encoder": to_mapping(encoder), "privacy": to_mapping(privacy)}
    with stage_run(run, "evaluate", config, tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        device = pick_device(run.device)
        precision = resolve_precision(settings.precision, device, key="evaluate.precision")
        manifest = read_manifest(run.paths.data)
        require_records(
            manifest,
            {
                "train": (1, "the members every privacy figure compares with"),
                "holdout": (1, "the real non-members every figure is read against"),
            },
            stage="evaluate",
        )
        names, dims, num_classes = manifest.label_names, manifest.spatial_dims, manifest.num_classes
        custody = check_synthetic_folder(run.paths.synthetic)  # every listed file unchanged, none missing, none extra
        synthetic = read_synthetic(run.paths.synthetic, spatial_dims=dims)
        train, holdout = load_split(manifest, "train"), load_split(manifest, "holdout")
        if synthetic.images.shape[1:] != tuple(holdout.images.shape[1:]):
            raise MedsynthError(
                f"synthetic images have shape {synthetic.images.shape[1:]}, the dataset {tuple(holdout.images.shape[1:])}: "
                "generate again from a model trained on this dataset"
            )
        generator = _audited_generator(synthetic, manifest, run, device)
        audited = _audited_inputs(custody, synthetic, generator, manifest, run, run_id)
        assert generator.checkpoint is not None
        dp = checkpoint_privacy(generator.checkpoint)

        out = Path(run.paths.evaluation)
        audit = _Progress(
            out / "metrics.json",
            limits=settings.limit_table(),
            base={
                "num_synthetic": len(synthetic),
                "num_train": len(train),
                "num_holdout": len(holdout),
                "precision": precision,
                "provenance": audited.record,
                "differential_privacy": dp.as_json() if dp is not None else None,
            },
        )
        _warn_if_few(len(train), len(holdout), len(synthetic))
        with audit.recording():
            audit.step("training (or loading) the feature encoder")
            measure = dataset_encoder(
                encoder, run.paths.data, train, spatial_dims=dims, device=device, seed=run.seed, progress=run.progress
            ).to(device)
            audit.step("measuring encoder features")
            sets: dict[str, AuditSet] = {}
            for name, (images, labels) in {
                "train": (train.images.numpy(), train.labels.numpy()),
                "holdout": (holdout.images.numpy(), holdout.labels.numpy()),
                "synthetic": (synthetic.images, synthetic.labels),
            }.items():
                measured = features(measure, images)
                sets[name] = AuditSet(images, labels, measured.items, measured.planes)
            audit.step("training the utility segmenters")
            segmenters = train_segmenters(
                settings.segmenter,
                real=train,
                synthetic=synthetic.arrays(),
                num_classes=num_classes,
                spatial_dims=dims,
                seed=settings.seed,
                device=device,
                precision=precision,
                progress=run.progress,
            )
            attacked = {
                name: attack_sample(data, manifest.split(name), max_records=settings.membership.max_records, seed=settings.seed)
                for name, data in (("train", train), ("holdout", holdout))
            }
            audit.step(
                f"running the membership attacks on {len(attacked['train'][0])} of {len(train)} training and "
                f"{len(attacked['holdout'][0])} of {len(holdout)} holdout records"
            )
            errors = {
                name: membership_errors(
                    generator,
                    data,
                    records,
                    timesteps=settings.membership.timesteps,
                    attacks=settings.membership.attacks,
                    seed=settings.seed,
                    batch_size=settings.membership.batch_size,
                    precision=precision,
                    progress=run.progress,
                    desc=f"membership attacks ({name})",
                )
                for name, (data, records) in attacked.items()
            }
            audit.step("computing the realism figures")
            audit.figures += realism_figures(
                *sets.values(),
                label_names=names,
                spatial_dims=dims,
                max_ssim_pairs=settings.max_ssim_pairs,
                seed=settings.seed,
                segment=lambda x: segment(segmenters["real"], torch.as_tensor(x)).numpy(),
                min_reference_dice=settings.min_reference_dice,
            )
            audit.step("computing the privacy figures")
            # the per-sample rules, calibrated as generate's gate calibrates them (same splits, encoder, settings)
            rules = calibrate_rules(
                sets["train"].images,
                sets["holdout"].images,
                privacy=privacy,
                encoder=measure,
                train_features=sets["train"].features,
                holdout_features=sets["holdout"].features,
            )
            _compare_gate(synthetic, rules)
            privacy_list, correlation, nearest = privacy_figures(
                *sets.values(),
                num_classes=num_classes,
                member_errors=errors["train"],
                nonmember_errors=errors["holdout"],
                rules=rules,
            )
            audit.figures += privacy_list
            audit.step("computing the utility figures")
            dice = {name: holdout_dice(model, holdout, num_classes=num_classes) for name, model in segmenters.items()}
            audit.figures += utility_figures(
                dice_real=dice["real"],
                dice_synthetic=dice["synthetic"],
                dice_both=dice["real+synthetic"],
                min_reference_dice=settings.min_reference_dice,
            )
            audit.figures += _dp_figures(dp)
            audit.step("writing metrics.json and the report")
            figures = audit.figures
            result = judge(figures, settings.limit_table())
            pictures: dict[str, Path] = {}
            if dims == 2:
                pictures = picture_sheets(out, synthetic, train, correlation, nearest, sheet_rows=settings.sheet_rows)
            body = {
                **audit.base,
                "partial": False,
                "verdict": result.as_json(),
                "privacy_rules": rules.describe(),
                "metrics": {f.name: f.as_json() for f in figures},
                "not_computable": not_computed(figures),
                "label_intensity_stats": {
                    split: label_intensity_stats(x.images, x.labels, label_names=names) for split, x in sets.items()
                },
            }
            metrics_path = write_json(out / "metrics.json", body)
            facts = {
                "synthetic samples": str(len(synthetic)),
                "training records": str(len(train)),
                "holdout records": str(len(holdout)),
                "checkpoint sha256": synthetic.rows[0].get("checkpoint_sha256", ""),
                "MLflow run": run_id,
                "differential privacy": dp.describe() if dp is not None else "none (trained without trainer.privacy)",
                "attacks' and segmenters' precision": precision,
            }
            report = write_text(
                out / "report.html",
                render_report(
                    title=f"medsynth evaluation: {run.name}",
                    figures=figures,
                    passed=result.passed,
                    reasons=result.reasons,
                    pictures=pictures,
                    facts=facts,
                    groups=result.groups,
                    provenance=audited.record,
                    differential_privacy=dp.as_json() if dp is not None else None,
                ),
            )

        tracker.log_params(run_id, {"precision_used": precision})
        _log_results(tracker, run_id, parent_run_id, figures, result, (metrics_path, report, *pictures.values()))
        _describe_runs(tracker, run_id, parent_run_id, result, report=report)
        if dp is not None:
            tracker.log_metrics(run_id, {"privacy/dp_delta": dp.delta})
        _log_custody(tracker, run_id, audited, passed=result.passed, metrics=metrics_path, run=run)
        return metrics_path


def not_computed(figures: list[Figure]) -> dict[str, str]:
    """``{figure: why}`` for every figure without a value (NaN), for ``metrics.json``.

    Args:
        figures: The audit's figures.

    Returns:
        The figures that could not be computed, with their note (or a plain statement without one).
    """
    return {f.name: f.note or "not computed" for f in figures if not np.isfinite(f.value)}


def _warn_if_few(train: int, holdout: int, synthetic: int) -> None:
    """Say up front which figures a set too small for them will leave out, and what gives it more images."""
    note = not_computable(train=train, holdout=holdout, synthetic=synthetic)
    if note:
        log.warning(
            "evaluate: figures that compare distributions or pairs (Fréchet distance, KID, MS-SSIM) are %s; "
            "they are marked not computable in metrics.json, and a limit on one fails its group",
            note,
        )


@dataclasses.dataclass
class _Progress:
    """What the audit has computed so far, so that a failure still leaves a record of it.

    Attributes:
        path: ``evaluation/metrics.json``.
        limits: The verdict's limits.
        base: The entries of ``metrics.json`` known before any figure (set sizes, provenance, DP).
        figures: The figures computed so far.
        doing: What the audit is doing now.
    """

    path: Path
    limits: Mapping[str, Mapping[str, float | None]]
    base: dict[str, Any]
    figures: list[Figure] = dataclasses.field(default_factory=list)
    doing: str = "starting"

    def step(self, doing: str) -> None:
        """Note (and log) what the audit does next."""
        self.doing = doing
        log.info("evaluate: %s", doing)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """On any error inside, write what was computed as a partial ``metrics.json`` (verdict FAIL) and
        say where: a user error gets it appended to its line, any other error is logged with it."""
        try:
            yield
        except Exception as err:
            message = str(err) if isinstance(err, MedsynthError) else f"{type(err).__name__}: {err}"
            path = self.write_partial(message)
            where = f"the audit stopped while {self.doing}; what it computed is in {path} (marked partial, verdict FAIL)"
            if isinstance(err, MedsynthError):
                raise err.with_note(where) from None
            log.error("evaluate: %s", where)
            raise

    def write_partial(self, message: str) -> Path:
        """Write the figures so far as ``metrics.json`` with ``"partial": true`` and a failed verdict, and a
        report that says so (an earlier run's report must not stand beside it)."""
        result = judge(self.figures, self.limits)
        reason = f"the audit did not finish: it stopped while {self.doing} ({message})"
        verdict = {**result.as_json(), "passed": False, "reasons": [reason, *result.reasons]}
        path = write_json(
            self.path,
            {
                **self.base,
                "partial": True,
                "stopped": {"while": self.doing, "error": message},
                "verdict": verdict,
                "metrics": {f.name: f.as_json() for f in self.figures},
                "not_computable": not_computed(self.figures),
            },
        )
        write_text(
            self.path.with_name("report.html"),
            render_report(
                title="medsynth evaluation (did not finish)",
                figures=self.figures,
                passed=False,
                reasons=verdict["reasons"],
                pictures={},
                facts={"stopped while": self.doing},
                groups=result.groups,
                provenance=self.base.get("provenance"),
                differential_privacy=self.base.get("differential_privacy"),
            ),
        )
        return path


def _dp_figures(dp: PrivacyRecord | None) -> list[Figure]:
    """The generator's differential-privacy epsilon as a figure (none without DP, so a limit on it
    then fails as not computed: ``evaluate.limits.privacy/dp_epsilon: {max: E}`` requires DP)."""
    if dp is None:
        return []
    return [
        Figure(
            "privacy/dp_epsilon",
            dp.epsilon,
            "lower",
            f"epsilon of the generator's patient-level differential privacy (delta {dp.delta:.3g}, {dp.accountant} "
            "accountant): a bound on what the weights reveal about any one training patient",
            headline=True,
        )
    ]


def _audited_generator(synthetic: SyntheticSet, manifest: Manifest, run: RunSettings, device: torch.device) -> Generator:
    """The generator the synthetic manifest names, if its checkpoint is byte for byte the one that made the samples."""
    source, expected = synthetic.generator_source()
    from_mlflow = source.startswith(("runs:/", "models:/")) or re.fullmatch(r"[0-9a-f]{32}", source) is not None
    if not from_mlflow and not Path(source).is_file():
        raise MedsynthError(
            f"checkpoint not found: {source}, the generator {synthetic.manifest} was made with: "
            "restore that file, or generate the set again"
        )
    generator = Generator.from_checkpoint(
        source, device=device, tracking_uri=run.mlflow.tracking_uri, download_dir=f"{run.paths.output}/downloads"
    )
    assert generator.checkpoint is not None
    actual = file_sha256(generator.checkpoint)
    if actual != expected:
        raise MedsynthError(
            f"checkpoint {generator.checkpoint} has SHA-256 {actual}, but {synthetic.manifest} was generated by "
            f"{expected}: the file changed since generation; generate again or restore that checkpoint"
        )
    if list(generator.label_names) != manifest.label_names:
        raise MedsynthError(
            f"checkpoint {source} was trained on labels {generator.label_names}, but the dataset at "
            f"{manifest.root} has {manifest.label_names}"
        )
    return generator


@dataclasses.dataclass(frozen=True)
class _Audited:
    """What the audit verified before any work, and the runs it came from."""

    custody: Custody
    record: dict[str, Any]  # the provenance block of metrics.json
    registered: tuple[str, str] | None  # (name, version) of the audited generator, when registered

    @property
    def runs(self) -> dict[str, str]:
        return self.record["runs"]


def _audited_inputs(
    custody: Custody, synthetic: SyntheticSet, generator: Generator, manifest: Manifest, run: RunSettings, run_id: str
) -> _Audited:
    """Check that ``data/manifest.json`` is the dataset the generator was trained on, and gather the provenance record."""
    facts = checkpoint_facts(generator)
    recorded = shared_value(
        custody.rows, "data_manifest_sha256", manifest=custody.manifest, what="the dataset the generator was trained on"
    )
    if facts["data_manifest_sha256"] and facts["data_manifest_sha256"] != recorded:
        raise MedsynthError(
            f"{custody.manifest} says its generator was trained on data manifest {recorded[:16]}..., but "
            f"checkpoint {generator.checkpoint} says {facts['data_manifest_sha256'][:16]}...: "
            "generate the set again"
        )
    data_file = Path(manifest.root) / "manifest.json"
    actual = file_sha256(data_file)
    if actual != recorded:
        raise MedsynthError(
            f"changed file: {data_file} has SHA-256 {actual[:16]}..., but the generator of "
            f"{custody.manifest} was trained on {recorded[:16]}...: audit against the dataset it was "
            "trained on (paths.data), or train and generate again"
        )
    source, checkpoint_hash = synthetic.generator_source()
    registered = None
    if run_id:  # with an MLflow store: is the audited generator a registered version?
        from medsynth.tracking.registry import find_model_version

        registered = find_model_version(
            source, checkpoint_sha256=checkpoint_hash, train_run_id=facts["run_id"], tracking_uri=run.mlflow.tracking_uri
        )
    runs = {
        "preprocess": facts["preprocess_run_id"] or preprocess_run_id(manifest.root, data_manifest_sha256=actual),
        "train": facts["run_id"],
        "generate": _generate_run_id(custody),
        "evaluate": run_id,
    }
    assert generator.checkpoint is not None
    record = provenance_record(
        custody,
        checkpoint_source=source,
        checkpoint_path=generator.checkpoint,
        checkpoint_sha256=checkpoint_hash,
        data_manifest=data_file,
        data_manifest_sha256=actual,
        runs=runs,
        output=run.paths.output,
        audit_file=Path(run.paths.evaluation) / "metrics.json",
        registered_model=f"models:/{registered[0]}/{registered[1]}" if registered else "",
    )
    return _Audited(custody, record, registered)


def _generate_run_id(custody: Custody) -> str:
    """The generate run that wrote the set, from its ``generate.json`` (``""`` when unknown)."""
    try:
        run_id = json.loads((custody.folder / "generate.json").read_text()).get("run_id", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return run_id if isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id) else ""


def _log_custody(tracker: TrackerLike, run_id: str, audited: _Audited, *, passed: bool, metrics: Path, run: RunSettings) -> None:
    """The audit's inputs as lineage tags and the audited set as a dataset input; the verdict on the
    registered model version it audited (tags, and the ``audited`` alias on a PASS)."""
    if not run_id:
        return
    record = audited.record
    tracker.set_tags(
        run_id,
        {
            f"{LINEAGE}{k}": v
            for k, v in {
                "generate_run_id": audited.runs["generate"],
                "train_run_id": audited.runs["train"],
                "preprocess_run_id": audited.runs["preprocess"],
                "checkpoint_sha256": record["checkpoint"]["sha256"],
                "data_manifest_sha256": record["data_manifest"]["sha256"],
                "synthetic_manifest_sha256": record["synthetic_manifest_sha256"],
                "registered_model": record["checkpoint"]["registered_model"],
            }.items()
            if v
        },
    )
    tracker.log_dataset(
        run_id,
        name=f"{run.name}/synthetic",
        sha256=record["synthetic_manifest_sha256"],
        source=audited.custody.folder,
        context="evaluation",
        num_records=len(audited.custody.rows),
    )
    if audited.registered is not None:
        from medsynth.tracking.registry import AUDITED_ALIAS, mark_audit

        status = mark_audit(
            *audited.registered,
            passed=passed,
            evaluate_run_id=run_id,
            metrics_sha256=file_sha256(metrics),
            tracking_uri=run.mlflow.tracking_uri,
        )
        log.info(
            "evaluate: marked %s with verdict %s%s",
            status.uri,
            status.verdict.upper(),
            f" and alias @{AUDITED_ALIAS}" if passed else "",
        )


_DESCRIPTION_TAG = "mlflow.note.content"
"""The tag MLflow shows (as Markdown) as a run's description, first on the run's page."""

_DESCRIPTION_LIMIT = 8000  # MLflow's longest tag value

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]])")


def _describe_verdict(result: Verdict, *, evaluate_run_id: str, experiment_id: str | None, report: Path) -> str:
    """The run description (Markdown) that states the verdict, its reasons and where the report is.

    Args:
        result: The audit's verdict.
        evaluate_run_id: The evaluate run that holds the report as its artifact ``evaluation/report.html``.
        experiment_id: Its MLflow experiment, for a link that opens the report in the MLflow UI
            (``None``: no link, the run and path alone).
        report: The report on disk.

    Returns:
        The description: the verdict and each group's, every broken limit, and the report's artifact
        path, run and file.
    """

    def md(text: str) -> str:
        return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("<", "&lt;").replace(">", "&gt;")

    groups = ", ".join(f"{name} {'PASS' if g.passed else 'FAIL'}" for name, g in result.groups.items())
    artifact = "evaluation/report.html"
    where = (
        f"[{artifact}](#/experiments/{experiment_id}/runs/{evaluate_run_id}/artifacts/{artifact})"
        if experiment_id
        else f"`{artifact}`"
    )
    # the UI shows the first lines until "Show more": the verdict and where the report is come first
    lines = [
        f"**Audit verdict: {'PASS' if result.passed else 'FAIL'}** ({groups})",
        "",
        f"Report: {where} in the Artifacts tab of the evaluate run `{evaluate_run_id}`; on disk "
        f"`{Path(report).resolve()}`, with every figure and limit in `metrics.json` beside it.",
        "",
    ]
    if not result.reasons:
        return "\n".join([*lines, "Every limit of the evaluation config holds: private, realistic and useful."])
    reasons = [f"- {md(reason)}" for reason in result.reasons]
    shown = len(reasons)  # as many as a tag holds, with room for the last line (the report has them all)
    while shown and len("\n".join([*lines, "Reasons:", "", *reasons[:shown]])) > _DESCRIPTION_LIMIT - 100:
        shown -= 1
    more = [f"- and {len(reasons) - shown} more: see the report"] if shown < len(reasons) else []
    return "\n".join([*lines, "Reasons:", "", *reasons[:shown], *more])


def _describe_runs(tracker: TrackerLike, run_id: str, parent_run_id: str | None, result: Verdict, *, report: Path) -> None:
    """Write the verdict's description (:func:`_describe_verdict`) on the evaluate run and its pipeline run."""
    if not run_id:
        return
    text = _describe_verdict(result, evaluate_run_id=run_id, experiment_id=getattr(tracker, "experiment_id", None), report=report)
    for target in (run_id, parent_run_id):
        if target:
            tracker.set_tags(target, {_DESCRIPTION_TAG: text})


def _compare_gate(synthetic: SyntheticSet, rules: PrivacyRules) -> None:
    """Warn when the set was not gated, or gated with other per-sample rules than the audit checks."""
    methods = {row.get("gate_method") or "off" for row in synthetic.rows}
    if methods == {"off"}:
        log.warning(
            "evaluate: %s was generated without the privacy gate; privacy/rule_violations_count says whether "
            "any sample breaks a per-sample rule",
            synthetic.manifest,
        )
    elif not all(m.endswith(rules.describe()["method"]) for m in methods):
        log.warning(
            "evaluate: %s was gated with other per-sample rules than this audit checks (gate: %s; audit: %s); "
            "the privacy settings, encoder or splits differ between generate and evaluate",
            synthetic.manifest,
            sorted(methods)[0],
            rules.describe()["method"],
        )


def _log_results(
    tracker: TrackerLike,
    run_id: str,
    parent_run_id: str | None,
    figures: list[Figure],
    result: Verdict,
    artifacts: tuple[Path, ...],
) -> None:
    """Figures as metrics, the verdict (overall and per group) as tags, the files as artifacts; headline
    figures and the verdict on the parent too."""
    tracker.log_metrics(run_id, {f.name.replace("/", "_"): f.value for f in figures if np.isfinite(f.value)})
    tags = {
        "medsynth.verdict": "pass" if result.passed else "fail",
        "medsynth.verdict_failed_groups": ",".join(result.failed_groups) or "none",
        **{f"medsynth.verdict.{name}": "pass" if g.passed else "fail" for name, g in result.groups.items()},
    }
    tracker.set_tags(run_id, {**tags, "medsynth.verdict_reasons": "; ".join(result.reasons) or "all limits hold"})
    for path in artifacts:
        tracker.log_artifact(run_id, path, artifact_path="evaluation")
    if parent_run_id:
        tracker.log_metrics(
            parent_run_id, {f.name.replace("/", "_"): f.value for f in figures if f.headline and np.isfinite(f.value)}
        )
        tracker.set_tags(parent_run_id, tags)
    log.info("evaluate: verdict %s", result.summary())
    log.info("evaluate: %s", ", ".join(f"{f.name}={f.value:.4g}" for f in figures if f.headline))
