"""Site data: discovery, validation, preprocessing, sampling and inspection of a site's scans."""

from fedsynth.common.data.datasets import (
    PairedSlices,
    PatientSlices,
    TrainingSlices,
    UnpairedSlices,
    training_set,
)
from fedsynth.common.data.discovery import Scan, SiteInventory, discover_site
from fedsynth.common.data.errors import (
    BadScansError,
    EmptySiteError,
    MissingModalityError,
    ScanError,
    SiteDataError,
)
from fedsynth.common.data.loading import LoadedScan, read_scan
from fedsynth.common.data.preprocess import (
    IntensityMapping,
    SliceCache,
    SliceStack,
    preprocess_scan,
)
from fedsynth.common.data.site import SiteData, Volume, assign_domains, load_site

__all__ = [
    "BadScansError",
    "EmptySiteError",
    "IntensityMapping",
    "LoadedScan",
    "MissingModalityError",
    "PairedSlices",
    "PatientSlices",
    "Scan",
    "ScanError",
    "SiteData",
    "SiteDataError",
    "SiteInventory",
    "SliceCache",
    "SliceStack",
    "TrainingSlices",
    "UnpairedSlices",
    "Volume",
    "assign_domains",
    "discover_site",
    "load_site",
    "preprocess_scan",
    "read_scan",
    "training_set",
]
