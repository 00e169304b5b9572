"""crgate's HTTP edge: the FastAPI app (app.py), access rules (deps.py), error mapping
(problems.py), crgate's own routes (routes/) and DICOMweb (dicomweb/: STOW-RS, QIDO-RS, WADO-RS).
Its state is the process's ``services.runtime.Runtime``."""
