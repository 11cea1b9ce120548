"""fedsynth.common.privacy: differential privacy, for the sites and the coordinator alike.

DP-SGD on every network that reads a real image, with one accountant per site (the sites train
with it), and the epsilon and noise calibration the coordinator's site-level DP uses too:

- :mod:`~fedsynth.common.privacy.accounting`: epsilon of a history of subsampled Gaussians, the
  noise that reaches a target epsilon (the one calibration both levels use), the site's
  accountant, and a group bound for a patient under slice-level DP;
- :mod:`~fedsynth.common.privacy.plan`: a site's noise plan (``q``, ``sigma``, steps) and budget;
- :mod:`~fedsynth.common.privacy.sampling`: Poisson batches over patients or examples;
- :mod:`~fedsynth.common.privacy.dp_sgd`: Opacus' wrapping of the trainer's networks;
- :mod:`~fedsynth.common.privacy.grad_samplers`: faster per-sample gradients for convolutions;
- :mod:`~fedsynth.common.privacy.site_level`: a site's clipped update under site-level DP.

CycleGAN's generators read real images (cycle, identity and registration losses), so the usual
"the generator is private by post-processing" argument does not hold: G_AB, G_BA, D_A, D_B and R
are all trained with per-sample clipping and Gaussian noise (Abadi et al. 2016) through Opacus.

**What one step releases.** A training step draws a Poisson batch (each example independently
with probability ``q``), then makes ``m`` noisy gradient releases on that same batch: one per
private network, each clipped per example to ``C`` and noised with ``N(0, (sigma C)^2)``. The
releases share one sample, so they are *not* ``m`` independently subsampled mechanisms (counting
them that way would under-state the cost: amplification by subsampling happens once per batch).
Jointly they are one Gaussian mechanism with L2 sensitivity ``sqrt(m) C`` and per-coordinate
noise ``sigma C`` (adaptive composition of Gaussians, Dong et al. 2022), i.e. a Poisson-subsampled
Gaussian with noise multiplier ``sigma / sqrt(m)``. The accountant records exactly that: one
step per training step with the *effective* multiplier. The D step after the G step sees fakes
made from the same examples, so it adds no new example to the batch.

**Unit of privacy.** With ``privacy.level = "patient"`` (the default), a patient: every session of
one subject. A step draws each of the site's patients independently with probability ``q``
(:class:`~fedsynth.common.privacy.sampling.PatientPoissonLoader`), and a drawn patient gives exactly
one of its own weakly paired slices (:class:`~fedsynth.common.data.datasets.PatientSlices`), so one
row of the batch is one patient and per-sample clipping bounds a patient's whole part of the step by
``C`` per network, whatever the patient's sessions and slices. Adding or removing a patient is then
the add/remove-one adjacency the Poisson-subsampled Gaussian analysis assumes, and the accountant's
epsilon is the patient's. With ``privacy.level = "example"`` the unit is one training example (the A
slice and B slice at one index of :class:`~fedsynth.common.data.datasets.TrainingSlices`); a patient
then fills many examples and :func:`~fedsynth.common.privacy.accounting.patient_epsilon` gives only
a group-privacy bound over them
(:meth:`~fedsynth.common.data.datasets.TrainingSlices.max_examples_per_subject`), which is vacuous
at any useful noise.

The accountant (``rdp`` or ``prv``, Opacus) and the noise plan persist in the site's state
between rounds, so epsilon is cumulative over the whole federation.
"""
