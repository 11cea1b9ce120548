"""Built-in brain phantom: BIDS hospital sites with known anatomy, physics and scanner effects.

Lets every test, demo and benchmark run offline, with the ground truth written beside the images.

Anatomy comes from the MNI ICBM152 2009 template and its grey- and white-matter probability maps
that ship inside the nilearn wheel. That template is skull-stripped, so the intracranial volume is
derived from its brain mask and the skull and scalp are built as shells of drawn thickness around
it. Every subject is the template under its own small affine transform and smooth random warp,
with optional ellipsoidal lesions. Contrasts come from physics: spin-echo and inversion-recovery
signal equations on per-tissue T1, T2 and PD tables (1.5 T and 3 T), CT numbers, PET uptake,
mixed by partial-volume fractions. Every site draws its own scanner: field strength, sequence
timings, bias field, Rician noise, intensity scale and offset, voxel size / slice thickness, CT
noise and PET resolution.

Layout written for ``site-k`` (subject labels such as ``s1p001`` are unique in the consortium)::

    site-k/dataset_description.json, README, participants.tsv, participants.json
    site-k/sub-X/anat/sub-X_{T1w,ce-gd_T1w,T2w,FLAIR,PD,ct}.nii.gz (+ .json sidecars)
    site-k/sub-X/pet/sub-X_pet.nii.gz (+ .json)
    site-k/derivatives/phantom/dataset_description.json, dseg.tsv, ground_truth.json
    site-k/derivatives/phantom/sub-X/anat/sub-X_dseg.nii.gz              uint8 labels
    site-k/derivatives/phantom/sub-X/anat/sub-X_probseg.nii.gz           4D fractions by label
    site-k/derivatives/phantom/sub-X/anat/sub-X_label-lesion_mask.nii.gz uint8 0/1

All images of a subject share one grid (the site's voxel size, RAS affine). MR images are int16
scanner units (non-negative), CT is int16 HU, PET float32 SUV-like uptake.

Tissue label table (``dseg`` is the argmax of the fractions; also ``derivatives/phantom/dseg.tsv``):

====  ==============
 0    background (air)
 1    csf
 2    gm
 3    wm
 4    soft_tissue (scalp)
 5    bone (skull)
 6    lesion
====  ==============

Modules: ``physics`` (tissue tables, signal equations), ``scanner`` (site scanners, seeding),
``anatomy`` (the template on a base grid, resampling), ``subject`` (warped heads, lesions),
``contrasts`` (MR, CT and PET rendering), ``bids`` (the folders, sidecars and ground truth) and
``consortium`` (the entry point, :func:`generate_consortium`).

Example:
    >>> from fedsynth.common.phantom import generate_consortium
    >>> sites = generate_consortium(Path("data"), sites=3, subjects=[8, 4, 2], seed=0)
"""

from __future__ import annotations

from fedsynth.common.phantom.anatomy import template_paths
from fedsynth.common.phantom.bids import BIDS_VERSION, GENERATOR_NAME, subject_label
from fedsynth.common.phantom.consortium import DEFAULT_MODALITIES, generate_consortium
from fedsynth.common.phantom.physics import (
    FIELD_STRENGTHS_T,
    LABELS,
    TISSUES,
    SequenceParams,
    TissueParams,
    inversion_recovery_signal,
    null_inversion_time,
    spin_echo_signal,
    tissue_signal,
    tissue_table,
)
from fedsynth.common.phantom.scanner import SiteScanner, draw_site_scanner
from fedsynth.common.phantom.subject import LesionSpec

__all__ = [
    "BIDS_VERSION",
    "DEFAULT_MODALITIES",
    "FIELD_STRENGTHS_T",
    "GENERATOR_NAME",
    "LABELS",
    "TISSUES",
    "LesionSpec",
    "SequenceParams",
    "SiteScanner",
    "TissueParams",
    "draw_site_scanner",
    "generate_consortium",
    "inversion_recovery_signal",
    "null_inversion_time",
    "spin_echo_signal",
    "subject_label",
    "template_paths",
    "tissue_signal",
    "tissue_table",
]
