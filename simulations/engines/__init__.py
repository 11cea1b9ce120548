"""fedsynth.simulations.engines: the ways ``fedsynth simulate`` runs a whole federation on one
machine."""
