"""A site completes the coordinator's instruction with the run's configuration it keeps."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedsynth.client.instruction import complete
from fedsynth.client.site_settings import SiteError
from fedsynth.client.state_store import DiskStore, MemoryStore, StateStore
from fedsynth.common.config import dumps_config, load_config
from fedsynth.common.messages import RoundInstruction

RUN = "run-1"


def _text(*overrides: str) -> str:
    return dumps_config(load_config(overrides=list(overrides), environ={}))


def _lean(text: str, round_number: int = 2) -> RoundInstruction:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()  # independent of config_digest
    return RoundInstruction(round=round_number, lr=1e-4, run_key=RUN, config_digest=digest)


def _full(text: str) -> RoundInstruction:
    lean = _lean(text, round_number=1)
    return RoundInstruction(lean.round, lean.lr, lean.run_key, lean.config_digest, text)


@pytest.fixture(params=["disk", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    return DiskStore(tmp_path / "state") if request.param == "disk" else MemoryStore()


def test_the_first_instruction_is_kept_and_later_ones_are_filled_in(store: StateStore) -> None:
    text = _text("federation.local_steps=7", "federation.strategy=fedprox")
    assert complete(_full(text), store).run_config == text
    filled = complete(_lean(text), store)
    assert filled.run_config == text
    assert filled.round == 2
    # What no longer travels is read from the configuration.
    assert filled.local_steps == 7
    assert filled.proximal_mu == load_config(environ={}).federation.proximal_mu > 0
    assert filled.share == "generators"
    assert filled.wire_dtype == "float32"


def test_fedavg_sends_no_proximal_term_and_local_epochs_apply_without_steps() -> None:
    instruction = _full(_text("federation.local_epochs=3", "federation.proximal_mu=0.5"))
    assert instruction.proximal_mu == 0.0
    assert instruction.local_steps == 0
    assert instruction.local_epochs == 3


def test_a_site_without_the_configuration_declines_and_says_so(store: StateStore) -> None:
    text = _text()
    with pytest.raises(SiteError, match=r"holds no configuration .* sends it with the next"):
        complete(_lean(text), store)
    with pytest.raises(ValueError, match="does not carry it"):
        _lean(text).config()


def test_a_configuration_that_does_not_match_its_digest_is_refused(store: StateStore) -> None:
    text = _text()
    altered = _full(text)
    altered = RoundInstruction(
        altered.round, altered.lr, altered.run_key, altered.config_digest, text + "\n# extra\n"
    )
    with pytest.raises(SiteError, match="does not match its digest"):
        complete(altered, store)
    assert store.load_config(RUN, _lean(text).config_digest) is None  # nothing kept


def test_a_kept_configuration_altered_on_disk_is_refused(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "state")
    text = _text()
    complete(_full(text), store)
    (kept,) = (tmp_path / "state" / RUN).glob("config-*.toml")
    kept.write_text(text.replace("generators", "all"), encoding="utf-8")
    with pytest.raises(SiteError, match="has been altered"):
        complete(_lean(text), store)
