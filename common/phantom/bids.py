"""Writing the phantom's BIDS folders: images, sidecars, site metadata and the ground truth."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import nibabel as nib
import numpy as np
import numpy.typing as npt

from fedsynth.common import __version__
from fedsynth.common.io import AS_OPEN, atomic_write_bytes
from fedsynth.common.modalities import Modality
from fedsynth.common.phantom.physics import _AIR_HU, _GD_R1, LABELS, TissueParams
from fedsynth.common.phantom.scanner import SiteScanner

GENERATOR_NAME: Final = "fedsynth phantom"
BIDS_VERSION: Final = "1.9.0"


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def _write_nifti(
    path: Path,
    data: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    on_disk: type[np.generic] | None = None,
) -> None:
    """Write a NIfTI-1 file byte-stably (gzip mtime 0, no file name in the gzip header).

    ``on_disk`` stores floats as a scaled integer type (nibabel picks the slope).
    """
    image = nib.Nifti1Image(data, affine)
    if on_disk is not None:
        image.set_data_dtype(on_disk)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = GENERATOR_NAME.encode()
    compressed = gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)
    atomic_write_bytes(path, compressed, AS_OPEN)


class _Writer:
    """Compresses and writes files on two threads while the next image is computed."""

    def __init__(self, workers: int = 2, max_pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phantom-io")
        self._pending: list[Future[None]] = []
        self._max_pending = max_pending

    def nifti(
        self,
        path: Path,
        data: npt.NDArray[Any],
        affine: npt.NDArray[np.float64],
        on_disk: type[np.generic] | None = None,
    ) -> None:
        self._submit(self._pool.submit(_write_nifti, path, data, affine, on_disk))

    def raw(self, path: Path, data: bytes) -> None:
        self._submit(self._pool.submit(atomic_write_bytes, path, data, AS_OPEN))

    def _submit(self, future: Future[None]) -> None:
        self._pending.append(future)
        while len(self._pending) > self._max_pending:
            self._pending.pop(0).result()

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def _round(value: Any) -> Any:
    """Round floats (recursively) so the JSON ground truth stays readable."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def _sidecar(modality: Modality, scanner: SiteScanner) -> dict[str, Any]:
    common = {
        "Manufacturer": "fedsynth",
        "ManufacturersModelName": GENERATOR_NAME,
        "SliceThickness": scanner.voxel_size_mm[2],
    }
    if modality is Modality.CT:
        return {**common, "Modality": "CT", "Units": "HU"}
    if modality is Modality.PET:
        return {
            **common,
            "Modality": "PT",
            "TracerName": "FDG",
            "Units": "g/mL",
            "ReconFilterSize": scanner.pet_fwhm_mm,
        }
    sequence = scanner.sequences[modality.value]
    sidecar: dict[str, Any] = {
        **common,
        "Modality": "MR",
        "MagneticFieldStrength": scanner.field_strength_t,
        "ScanningSequence": "IR" if sequence.kind == "inversion_recovery" else "SE",
        "RepetitionTime": sequence.tr_ms / 1000.0,
        "EchoTime": sequence.te_ms / 1000.0,
    }
    if sequence.ti_ms is not None:
        sidecar["InversionTime"] = sequence.ti_ms / 1000.0
    if sequence.contrast_agent:
        sidecar["ContrastBolusIngredient"] = "GADOLINIUM"
    return sidecar


def _image_path(site_dir: Path, label: str, modality: Modality) -> Path:
    folder = site_dir / f"sub-{label}" / modality.bids_datatype
    return folder / f"sub-{label}_{modality.bids_stem}.nii.gz"


def subject_label(site: int, index: int) -> str:
    """BIDS subject label of the ``index``-th (1-based) subject of ``site``, e.g. ``s1p001``."""
    return f"s{site}p{index:03d}"


def _derivatives_dir(site_dir: Path) -> Path:
    """Folder of a site's ground truth: ``site-k/derivatives/phantom``."""
    return site_dir / "derivatives" / "phantom"


def _prepare_site_dir(site_dir: Path, overwrite: bool) -> None:
    if site_dir.exists() and any(site_dir.iterdir()):
        description = site_dir / "dataset_description.json"
        made_here = False
        if description.is_file():
            try:
                generated = json.loads(description.read_text()).get("GeneratedBy", [])
                made_here = any(entry.get("Name") == GENERATOR_NAME for entry in generated)
            except (json.JSONDecodeError, AttributeError):
                made_here = False
        if not overwrite:
            raise FileExistsError(
                f"{site_dir} already exists and is not empty; pass overwrite=True to replace a "
                "phantom site, or choose another out_dir"
            )
        if not made_here:
            raise FileExistsError(
                f"{site_dir} is not a phantom site (no {description.name} generated by "
                f"{GENERATOR_NAME!r}); refusing to delete it"
            )
        shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)


def _write_site_metadata(writer: _Writer, site_dir: Path, site: int, seed: int) -> None:
    generated_by = [
        {
            "Name": GENERATOR_NAME,
            "Version": __version__,
            "Description": f"synthetic brain phantom, seed {seed}, site {site}",
        }
    ]
    derivatives = _derivatives_dir(site_dir)
    derivatives.mkdir(parents=True, exist_ok=True)
    # Written first (synchronously): it marks the folder as a phantom site for overwrite=True.
    atomic_write_bytes(
        site_dir / "dataset_description.json",
        _json_bytes(
            {
                "Name": f"fedsynth phantom site-{site}",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "raw",
                "GeneratedBy": generated_by,
            }
        ),
        AS_OPEN,
    )
    writer.raw(
        site_dir / "participants.json",
        _json_bytes(
            {
                "participant_id": {"Description": "subject label, unique in the consortium"},
                "n_lesions": {"Description": "number of simulated lesions"},
            }
        ),
    )
    writer.raw(
        site_dir / "README",
        (
            f"Synthetic brain phantom site {site} written by {GENERATOR_NAME} {__version__} "
            f"(seed {seed}).\nGround truth: derivatives/phantom/ground_truth.json.\n"
        ).encode(),
    )
    writer.raw(
        derivatives / "dataset_description.json",
        _json_bytes(
            {
                "Name": f"fedsynth phantom site-{site} ground truth",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": generated_by,
            }
        ),
    )
    writer.raw(
        derivatives / "dseg.tsv",
        ("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LABELS.items())).encode(),
    )


def _write_site_records(
    writer: _Writer,
    site_dir: Path,
    records: Sequence[dict[str, Any]],
    truth: dict[str, Any],
) -> None:
    """Write ``participants.tsv`` and ``ground_truth.json`` (``truth`` plus the records)."""
    participants = "participant_id\tn_lesions\n" + "".join(
        f"sub-{r['id']}\t{len(r['lesions'])}\n" for r in records
    )
    writer.raw(site_dir / "participants.tsv", participants.encode())
    truth["subjects"] = list(records)
    derivatives = _derivatives_dir(site_dir)
    writer.raw(derivatives / "ground_truth.json", _json_bytes(_round(truth)))


def _ground_truth(
    seed: int,
    site: int,
    voxel_size: float,
    lesions: bool,
    modalities: Sequence[Modality],
    scanner: SiteScanner,
    tissues: dict[str, TissueParams],
) -> dict[str, Any]:
    scanner_record = asdict(scanner)
    sequences = scanner_record.pop("sequences")
    return {
        "generator": {"name": GENERATOR_NAME, "version": __version__},
        "seed": seed,
        "site": site,
        "base_voxel_size_mm": voxel_size,
        "lesions_enabled": lesions,
        "modalities": [m.value for m in modalities],
        "template": "MNI ICBM152 2009a nonlinear symmetric (nilearn), GM/WM probability maps",
        "scanner": scanner_record,
        "sequences": {
            name: seq for name, seq in sequences.items() if Modality.parse(name) in modalities
        },
        "signal_equations": {
            "spin_echo": "PD (1 - exp(-TR/T1)) exp(-TE/T2)",
            "inversion_recovery": "PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)",
            "contrast_agent": "1/T1' = 1/T1 + r1 [Gd], r1 = "
            f"{_GD_R1[scanner.field_strength_t]} L/mmol/s",
            "mr_noise": "magnitude = |S bias + sigma (n1 + i n2)|, "
            "sigma = mr_noise x max(S_csf, S_gm, S_wm); image = scale x magnitude + offset",
            "voxel_signal": "sum over tissues of (fraction x tissue signal)",
            "ct": "HU = sum over tissues of (fraction x HU), air -1000, bone fraction x "
            "bone_mean_hu x (0.7 + 0.6 (2 depth - 1)^2) with depth 0..1 across the skull; "
            "+ ct_offset_hu + N(0, ct_noise_hu)",
            "pet": "uptake = pet_scale x pet_calibration x sum(fraction x pet_uptake), plus noise "
            "of pet_noise x sqrt(uptake x grey-matter uptake) after a Gaussian blur of "
            "pet_fwhm_mm",
        },
        "tissues": {name: asdict(params) for name, params in tissues.items()},
        "air_hu": _AIR_HU,
        "labels": {str(k): v for k, v in LABELS.items()},
    }
