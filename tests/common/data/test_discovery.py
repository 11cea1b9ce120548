"""Site discovery: BIDS (with and without sessions) and plain modality folders.

Discovery reads names only, so the files written here are tiny valid NIfTI volumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from fedsynth.common.data import MissingModalityError, discover_site
from fedsynth.common.data.discovery import SiteInventory
from fedsynth.common.modalities import Direction, Modality
from tests.conftest import save_nifti


def _touch(root: Path, *relative: str) -> None:
    """Write a tiny NIfTI at each relative path (or a text file when it is not a NIfTI name)."""
    for rel in relative:
        path = root / rel
        if rel.endswith((".nii", ".nii.gz")):
            save_nifti(path, np.arange(8, dtype=np.float32).reshape(2, 2, 2))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")


def _found(inventory: SiteInventory) -> set[tuple[str, Modality, str | None, str]]:
    """(subject, modality, session, path relative to the root) of every scan."""
    return {
        (s.subject, s.modality, s.session, s.path.relative_to(inventory.root).as_posix())
        for s in inventory.scans
    }


# --------------------------------------------------------------------------- BIDS


def test_bids_without_sessions(tmp_path: Path) -> None:
    files = [
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_T2w.nii.gz",
        "sub-02/anat/sub-02_T1w.nii",
        "sub-02/anat/sub-02_FLAIR.nii.gz",
        "sub-02/anat/sub-02_PD.nii.gz",
        "sub-03/anat/sub-03_ct.nii.gz",
    ]
    _touch(tmp_path, *files)

    inventory = discover_site(tmp_path)

    assert inventory.layout == "bids"
    assert inventory.name == tmp_path.name
    assert _found(inventory) == {
        ("sub-01", Modality.T1W, None, files[0]),
        ("sub-01", Modality.T2W, None, files[1]),
        ("sub-02", Modality.T1W, None, files[2]),
        ("sub-02", Modality.FLAIR, None, files[3]),
        ("sub-02", Modality.PD, None, files[4]),
        ("sub-03", Modality.CT, None, files[5]),
    }


def test_bids_with_sessions_and_extra_entities(tmp_path: Path) -> None:
    files = [
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-1/anat/sub-01_ses-1_T2w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_acq-fast_run-2_T1w.nii.gz",
        "sub-02/anat/sub-02_T2w.nii.gz",  # sessions are optional per subject
    ]
    _touch(tmp_path, *files)

    inventory = discover_site(tmp_path)

    assert inventory.layout == "bids"
    assert _found(inventory) == {
        ("sub-01", Modality.T1W, "ses-1", files[0]),
        ("sub-01", Modality.T2W, "ses-1", files[1]),
        ("sub-01", Modality.T1W, "ses-2", files[2]),
        ("sub-02", Modality.T2W, None, files[3]),
    }
    fast = next(s for s in inventory.scans if s.session == "ses-2")
    assert fast.entities == (("acq", "fast"), ("run", "2"))
    assert fast.label == "sub-01 ses-2 T1w"
    assert next(s for s in inventory.scans if s.subject == "sub-02").label == "sub-02 T2w"


def test_ce_entity_marks_contrast_enhanced_t1w(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/anat/sub-01_ce-gd_T1w.nii.gz",
        "sub-02/ses-a/anat/sub-02_ses-a_ce-gadolinium_T1w.nii.gz",
    )

    inventory = discover_site(tmp_path)

    kinds = {s.path.name: s.modality for s in inventory.scans}
    assert kinds == {
        "sub-01_T1w.nii.gz": Modality.T1W,
        "sub-01_ce-gd_T1w.nii.gz": Modality.T1W_CE,
        "sub-02_ses-a_ce-gadolinium_T1w.nii.gz": Modality.T1W_CE,
    }
    # The writer's own naming round-trips: Modality.bids_stem is what discovery parses.
    assert Modality.T1W_CE.bids_stem == "ce-gd_T1w"


def test_pet_datatype_folder(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/pet/sub-01_pet.nii.gz",
        "sub-02/ses-1/pet/sub-02_ses-1_trc-FDG_pet.nii.gz",
        "sub-02/ses-1/anat/sub-02_ses-1_ct.nii.gz",
    )

    inventory = discover_site(tmp_path)

    assert _found(inventory) == {
        ("sub-01", Modality.T1W, None, "sub-01/anat/sub-01_T1w.nii.gz"),
        ("sub-01", Modality.PET, None, "sub-01/pet/sub-01_pet.nii.gz"),
        ("sub-02", Modality.PET, "ses-1", "sub-02/ses-1/pet/sub-02_ses-1_trc-FDG_pet.nii.gz"),
        ("sub-02", Modality.CT, "ses-1", "sub-02/ses-1/anat/sub-02_ses-1_ct.nii.gz"),
    }
    assert Modality.PET.bids_datatype == "pet"


def test_bids_ignores_derivatives_masks_sidecars_and_hidden_files(tmp_path: Path) -> None:
    keep = "sub-01/anat/sub-01_T1w.nii.gz"
    _touch(
        tmp_path,
        keep,
        "sub-01/anat/sub-01_T1w.json",  # sidecar
        "sub-01/anat/sub-01_desc-brain_mask.nii.gz",  # mask
        "sub-01/anat/sub-01_dseg.nii.gz",  # segmentation
        "sub-01/anat/sub-01_label-GM_probseg.nii.gz",
        "sub-01/anat/.sub-01_T2w.nii.gz",  # hidden
        "sub-01/anat/._sub-01_T1w.nii.gz",  # macOS resource fork
        "sub-01/anat/sub-01_T2w.nii.gz.bak",
        "sub-01/func/sub-01_task-rest_bold.nii.gz",  # not an anatomical datatype
        "derivatives/sub-01/anat/sub-01_T2w.nii.gz",
        "derivatives/phantom/sub-01/anat/sub-01_FLAIR.nii.gz",
        "sourcedata/sub-01/anat/sub-01_PD.nii.gz",
    )

    inventory = discover_site(tmp_path)

    assert _found(inventory) == {("sub-01", Modality.T1W, None, keep)}


def test_subject_label_disagreeing_with_folder_is_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stray = "sub-02/anat/sub-03_T2w.nii.gz"
    _touch(tmp_path, "sub-02/anat/sub-02_T1w.nii.gz", stray)

    with caplog.at_level(logging.WARNING, logger="fedsynth.common.data.discovery"):
        inventory = discover_site(tmp_path)

    assert _found(inventory) == {("sub-02", Modality.T1W, None, "sub-02/anat/sub-02_T1w.nii.gz")}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(tmp_path / stray) in warnings[0]
    assert "sub-03" in warnings[0] and "sub-02" in warnings[0]


# --------------------------------------------------------------------------- plain layout


def test_plain_layout_pairs_by_file_stem(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "T1w/p01.nii.gz",
        "T1w/p02.nii.gz",
        "T1w/p03.nii",
        "t2/p01.nii.gz",
        "t2/p02.nii",
        "t2/.p03.nii.gz",  # hidden: ignored
        "t2/notes.txt",
        "masks/p01.nii.gz",  # not a modality folder
        "p04.nii.gz",  # loose file at the root
    )

    inventory = discover_site(tmp_path)

    assert inventory.layout == "plain"
    assert inventory.subjects() == ["p01", "p02", "p03"]
    table = inventory.by_subject()
    assert {subject: set(row) for subject, row in table.items()} == {
        "p01": {Modality.T1W, Modality.T2W},
        "p02": {Modality.T1W, Modality.T2W},
        "p03": {Modality.T1W},
    }
    assert table["p01"][Modality.T2W][0].path == tmp_path / "t2/p01.nii.gz"
    assert all(s.session is None and s.entities == () for s in inventory.scans)


@pytest.mark.parametrize(
    ("folder", "modality"),
    [
        ("T1w", Modality.T1W),
        ("t1w", Modality.T1W),
        ("T1", Modality.T1W),
        ("T1W", Modality.T1W),
        ("t1c", Modality.T1W_CE),
        ("T1CE", Modality.T1W_CE),
        ("T1w_ce", Modality.T1W_CE),
        ("T2", Modality.T2W),
        ("t2w", Modality.T2W),
        ("flair", Modality.FLAIR),
        ("FLAIR", Modality.FLAIR),
        ("PDw", Modality.PD),
        ("CT", Modality.CT),
        ("Pet", Modality.PET),
    ],
)
def test_plain_folder_names_are_case_insensitive_with_aliases(
    tmp_path: Path, folder: str, modality: Modality
) -> None:
    _touch(tmp_path, f"{folder}/case-7.nii.gz")

    inventory = discover_site(tmp_path)

    assert [(s.subject, s.modality) for s in inventory.scans] == [("case-7", modality)]


# --------------------------------------------------------------------------- inventory queries


def test_inventory_queries(tmp_path: Path) -> None:
    # Written in an order unrelated to the Modality enum, to check modalities() sorts.
    _touch(
        tmp_path,
        "sub-b/pet/sub-b_pet.nii.gz",
        "sub-b/anat/sub-b_FLAIR.nii.gz",
        "sub-a/ses-2/anat/sub-a_ses-2_T1w.nii.gz",
        "sub-a/ses-1/anat/sub-a_ses-1_T1w.nii.gz",
        "sub-a/ses-1/anat/sub-a_ses-1_ce-gd_T1w.nii.gz",
        "sub-c/anat/sub-c_ct.nii.gz",
    )

    inventory = discover_site(tmp_path)

    enum_order = [Modality.T1W, Modality.T1W_CE, Modality.FLAIR, Modality.CT, Modality.PET]
    assert inventory.modalities() == enum_order
    assert inventory.subjects() == ["sub-a", "sub-b", "sub-c"]
    table = inventory.by_subject()
    assert list(table) == ["sub-a", "sub-b", "sub-c"]
    assert sorted(s.session or "" for s in table["sub-a"][Modality.T1W]) == ["ses-1", "ses-2"]
    assert [s.session for s in table["sub-a"][Modality.T1W_CE]] == ["ses-1"]
    assert set(table["sub-b"]) == {Modality.FLAIR, Modality.PET}
    assert set(table["sub-c"]) == {Modality.CT}
    # by_subject() is a partition of the scans.
    flattened = [s for row in table.values() for scans in row.values() for s in scans]
    assert sorted(map(str, (s.path for s in flattened))) == sorted(
        str(s.path) for s in inventory.scans
    )
    assert len(inventory.scans_of(Modality.T1W)) == 2
    assert inventory.scans_of(Modality.T2W) == []


def test_require_names_the_missing_modalities(tmp_path: Path) -> None:
    _touch(tmp_path, "sub-01/anat/sub-01_T1w.nii.gz", "sub-01/anat/sub-01_FLAIR.nii.gz")
    inventory = discover_site(tmp_path)

    inventory.require(Direction.parse("T1w->FLAIR"))  # both present: no error
    inventory.require(Direction.parse("FLAIR->T1w"))

    with pytest.raises(MissingModalityError) as one:
        inventory.require(Direction.parse("T1w->T2w"))
    message = str(one.value)
    assert "needs T2w scans" in message
    assert "T1w and" not in message  # the present source is not reported missing
    assert str(tmp_path) in message and "found: T1w, FLAIR" in message

    with pytest.raises(MissingModalityError) as two:
        inventory.require(Direction.parse("PD->ct"))
    assert "needs PD and ct scans" in str(two.value)
