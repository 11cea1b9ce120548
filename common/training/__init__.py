"""fedsynth.common.training: training a CycleGAN-style model, wherever it is trained.

A hospital trains with it in every round and in ``train-local``; the coordinator trains the
public phantom warm start with it; a simulated experiment trains its pooled model with it.

- :mod:`~fedsynth.common.training.trainer`: ``CycleGANTrainer``, the networks, their optimisers
  and one training step;
- :mod:`~fedsynth.common.training.private_step`: going private and one DP-SGD step (chunks of a
  Poisson batch, empty batches);
- :mod:`~fedsynth.common.training.epoch`: one pass over a loader (progress, report lines, means);
- :mod:`~fedsynth.common.training.state`: saving and restoring the trainer's state and the RNGs;
- :mod:`~fedsynth.common.training.pool`: CycleGAN's image pool;
- :mod:`~fedsynth.common.training.objectives`: the generators' losses per kind of example;
- :mod:`~fedsynth.common.training.schedule`: the learning-rate decay of epochs and rounds;
- :mod:`~fedsynth.common.training.data`: the sites as loaded, the loader, the output scale.
"""
