"""The quality study on real multi-site brain MRI (issue 8; protocol in benchmarks/README.md).

One command runs the whole study, and the same command continues it after an interruption:

    .venv/bin/python -m benchmarks.study_real --out runs/study-real

It needs ``<data>/brain-mri/site-*`` (one folder per hospital, BIDS inside, T1w with T2w and
FLAIR co-registered within each subject), optionally ``<data>/brain-mri-clinical/site-e`` (raw
clinical scans: each contrast on its own grid, misaligned, some subjects missing one) with its
co-registered copy ``site-e-coreg``, and, for MRI -> CT, ``<data>/brain-ct/site-ct``.

* **Leave one site out.** For every MRI site and every direction (T1w->T2w, then T1w->FLAIR),
  ``fedsynth simulate``'s experiment (:func:`~fedsynth.simulations.experiment.run_experiment`)
  trains on the other sites as they are (the natural split, no held-out subjects) and evaluates on
  the left-out site (``--eval-site``): the federation on Flower's simulation engine, a local-only
  model per training site and the pooled model, with the federation's compute. Sites train on what
  they hold: a session's contrasts as weakly paired examples (the raw clinical site's brought onto
  one grid by their scanner affines), the rest unpaired (:mod:`fedsynth.common.data.pairing`). Each
  model is the one its training sites' own validation data chose (best round or epoch). The clinical
  site trains on its raw scans and is scored, when left out, on its co-registered copy; the copy is
  never trained on.
* **Naive baselines** (:mod:`fedsynth.common.baselines`), fitted from the training sites' intensity
  statistics (each site's own, summed as a coordinator would) and scored on the left-out site's
  pairs in the same mask: the training sites' mean target intensity (constant), histogram
  matching of the left-out site's T1w onto the training target intensities, and the lookup
  table from T1w intensity to mean target intensity. They are cheap and recomputed on every
  invocation, also for experiments that finished before they existed.
* **Variants** on the first fold, federated only: patient-level DP at epsilon 8 (delta 1e-5)
  per site, and the registration loss (RegGAN's R). The other arms train without R. Each site
  here holds one to five patients, so its Poisson sampling rate over patients is 1 (or near
  it) and epsilon 8 comes from noise alone: the arm shows what patient-level DP costs when a
  hospital brings a handful of patients, not what it gives a real cohort (BENCHMARKS.md,
  "Patient-level DP on a 400-patient consortium", is that).
* **MRI -> CT**: a T1w -> CT model on every MRI site's T1w and the CT site's CT (pooled: a
  CycleGAN site needs both domains to train, and no site holds both), the same number of epochs;
  ``fedsynth synthesize`` turns each T1w into a synthetic CT in Hounsfield units, and the HU of
  CSF, grey and white matter (a three-class clustering of the T1w) are set against the real CT's
  (standard Hounsfield windows inside the skull) and its bone.

Everything lands in ``--out``: one experiment folder per fold and variant (each with its own
report), ``study.json`` (the settings), ``results.json`` (every figure of the tables),
``report.md`` with the tables, the goals and the image grids under ``figures/``. The settings
of the study (rounds, local epochs) are fixed per preset in :data:`SETTINGS`, chosen from the
time budget before any score was seen; ``--set`` adds overrides (recorded in ``study.json``,
and a folder started with other settings is refused unless ``--overwrite``).

Modules: ``settings`` (the fixed settings, :class:`Study`, the sites, ``study.json``), ``arms``
(one fold's experiment and naive baselines), ``scores`` (the table, the curves, the goals), ``ct``
(MRI -> CT and its Hounsfield units), ``figures`` (the image grids), ``report`` (``report.md``,
with the Markdown tables and figure helpers of :mod:`fedsynth.simulations.report`) and ``run``
(:func:`run_study` and :func:`main`, which ``python -m benchmarks.study_real`` runs).
"""

from __future__ import annotations

from benchmarks.study_real.arms import NaiveArms, experiment_dir, naive_arms, run_fold
from benchmarks.study_real.ct import (
    brain_mask,
    ct_pool,
    intracranial,
    real_ct_hu,
    run_ct,
    synthetic_tissue_hu,
    three_classes,
)
from benchmarks.study_real.figures import ct_grid, mri_grid, naive_panels
from benchmarks.study_real.report import ARM_ORDER, ct_section, direction_section, write_report
from benchmarks.study_real.run import compute_seconds, main, parse_args, run_study
from benchmarks.study_real.scores import beats_naive, fold_rows, goals, round_curves, summarise
from benchmarks.study_real.settings import (
    BONE_HU,
    CLINICAL,
    COMMON,
    DIRECTIONS,
    HU_WINDOWS,
    LOCAL_MEAN,
    METRICS,
    NAIVE_GOAL_DB,
    NAIVE_GOAL_FOLDS,
    NAIVE_GOAL_SSIM,
    SETTINGS,
    STUDY_NAME,
    TISSUES,
    VARIANT_LABELS,
    VARIANT_SETTINGS,
    VARIANTS,
    Study,
    StudyError,
    find_sites,
    open_study,
    slug,
)
from fedsynth.simulations.report import REPORT_NAME
from fedsynth.simulations.results import RESULTS_NAME

__all__ = [
    "ARM_ORDER",
    "BONE_HU",
    "CLINICAL",
    "COMMON",
    "DIRECTIONS",
    "HU_WINDOWS",
    "LOCAL_MEAN",
    "METRICS",
    "NAIVE_GOAL_DB",
    "NAIVE_GOAL_FOLDS",
    "NAIVE_GOAL_SSIM",
    "REPORT_NAME",
    "RESULTS_NAME",
    "SETTINGS",
    "STUDY_NAME",
    "TISSUES",
    "VARIANTS",
    "VARIANT_LABELS",
    "VARIANT_SETTINGS",
    "NaiveArms",
    "Study",
    "StudyError",
    "beats_naive",
    "brain_mask",
    "compute_seconds",
    "ct_grid",
    "ct_pool",
    "ct_section",
    "direction_section",
    "experiment_dir",
    "find_sites",
    "fold_rows",
    "goals",
    "intracranial",
    "main",
    "mri_grid",
    "naive_arms",
    "naive_panels",
    "open_study",
    "parse_args",
    "real_ct_hu",
    "round_curves",
    "run_ct",
    "run_fold",
    "run_study",
    "slug",
    "summarise",
    "synthetic_tissue_hu",
    "three_classes",
    "write_report",
]
