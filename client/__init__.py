"""fedsynth.client: the hospital side (Flower ClientApp, local trainer, privacy engine wiring).

Imports ``common`` only, never ``server``.
"""
