"""A hospital's data as a round sees it: loaded, with its validation part held out.

A failure to load becomes a :class:`~fedsynth.client.site_settings.SiteError` whose message is
safe to send to the coordinator; the site's own log keeps the details.
"""

from __future__ import annotations

import logging

from fedsynth.client.site_settings import SiteError, SiteSettings
from fedsynth.common.config import RunConfig
from fedsynth.common.data.errors import BadScansError, EmptySiteError, MissingModalityError
from fedsynth.common.data.site import SiteData, load_site
from fedsynth.common.data.validation import hold_out

logger = logging.getLogger(__name__)


def load_site_data(settings: SiteSettings, config: RunConfig) -> SiteData:
    """The site's data; a failure becomes a :class:`SiteError` that names no path or subject."""
    data = config.data
    if settings.skip_bad and not data.skip_bad:
        data = data.model_copy(update={"skip_bad": True})
    try:
        return load_site(
            settings.data_dir, data, cache_dir=settings.cache_dir, seed=config.training.seed
        )
    except EmptySiteError as exc:
        logger.error("site data: %s", exc)
        raise SiteError("no scans found in the site's data folder") from None
    except MissingModalityError as exc:
        logger.error("site data: %s", exc)
        raise SiteError(
            f"no usable scans for {config.data.direction}: a modality is missing or all of its "
            "scans are unusable (the site's log names them)"
        ) from None
    except BadScansError as exc:
        logger.error("site data: %s", exc)
        raise SiteError(
            f"{exc.summary} (the site's log names them; the hospital can fix them or start its "
            "daemon with --skip-bad)"
        ) from None


def split_site(settings: SiteSettings, config: RunConfig) -> SiteData:
    """The site with its validation part held out (the same split every round and message)."""
    return hold_out(
        load_site_data(settings, config), config.data.validation_fraction, config.training.seed
    )
