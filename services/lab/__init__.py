"""Research code beside the gateway: it uses :mod:`services.core`, never the other way round.

- :mod:`.phantom`: synthetic four-view mammography studies with ground truth (`crgate synth`).
- :mod:`.safety`: the CR safety study (`crgate study`): labels, compressed copies, paired
  bootstrap, recommendation, plots and report.
- :mod:`.sweeps`: the safety study as a job on stored studies (`POST /studies:cr-sweep`).
- :mod:`.training`: training data, `crgate train` and the seed study's experiments
  (`crgate experiment`); needs torch (the ``train`` extra). The model definitions stay in
  ``models/``.
"""
