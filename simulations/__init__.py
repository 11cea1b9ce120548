"""fedsynth.simulations: many simulated hospitals on one machine, and the report on them.

- ``experiment.py``: one ``fedsynth simulate`` experiment in phases (``phases.py``): ``split.py``
  and ``partition.py`` (pool and split), ``training.py`` (the federation, local and pooled
  models), ``evaluation.py`` and ``scoring.py`` (test sets, naive baselines, every model scored);
- ``engines/``: Flower's simulation engine and an in-process transport, one interface;
- ``results.py`` (``results.json``), ``report/`` (``report.md`` and its figures), ``grid.py``,
  ``cli.py`` (``fedsynth simulate``).

The one package besides ``fedsynth.cli`` that may import ``common``, ``client`` and ``server``.
"""
