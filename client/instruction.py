"""The coordinator's instruction as a site completes it: the run's configuration from the message,
or, when the message names it by digest only, from what the site kept of an earlier one.

The coordinator sends the configuration's TOML until a site has replied without error once
(:class:`~fedsynth.server.exchange.SiteExchange`); after that only its SHA-256 travels. A site
checks the text it receives against the digest, keeps it in its state store, and fills later
instructions in from there. A site that lost its store mid-run (a wiped state folder, a restarted
simulated node) declines that one round, and the coordinator sends the text again next time.
"""

from __future__ import annotations

from dataclasses import replace

from fedsynth.client.site_settings import SiteError
from fedsynth.client.state_store import StateStore
from fedsynth.common.messages import RoundInstruction, config_digest


def complete(instruction: RoundInstruction, store: StateStore) -> RoundInstruction:
    """``instruction`` with the run's configuration in it; the configuration kept in ``store``."""
    digest = instruction.config_digest
    if instruction.run_config:
        if config_digest(instruction.run_config) != digest:
            raise SiteError(
                f"the coordinator's configuration does not match its digest {digest[:12]}: "
                "refusing a configuration altered on the way"
            )
        if store.load_config(instruction.run_key, digest) is None:
            store.save_config(instruction.run_key, digest, instruction.run_config)
        return instruction
    text = store.load_config(instruction.run_key, digest)
    if text is None:
        raise SiteError(
            f"this site holds no configuration {digest[:12]} for run {instruction.run_key} (its "
            "state was reset during the run?); the coordinator sends it with the next instruction"
        )
    if config_digest(text) != digest:
        raise SiteError(f"the configuration this site kept as {digest[:12]} has been altered")
    return replace(instruction, run_config=text)
