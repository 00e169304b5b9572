"""The CR safety study: how far can images be compressed before a model's AUROC suffers?

:mod:`.labels` reads the labelled set, :mod:`.copies` makes (and caches) the compressed copies,
:mod:`.sweep` classifies every breast at every CR (resumable, per-CR partial results),
:mod:`.analysis` turns the probabilities into paired-bootstrap statistics, :mod:`.recommend`
picks the highest non-inferior CR, and :mod:`.report` / :mod:`.plots` write the report folder.
"""
