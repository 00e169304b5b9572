"""Training on phantoms (needs torch): :mod:`.data` (breasts, splits, the compressed-copy
cache), :mod:`.train` (`crgate train`: fit, test, export ONNX and the card), :mod:`.experiments`
with :mod:`.experiment_report` and :mod:`.experiment_panel` (`crgate experiment`)."""
