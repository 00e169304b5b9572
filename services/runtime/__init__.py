"""The assembly layer: every crgate process (api, scp, serve, worker, CLI) is built here.

- ``assembly``: ``build_runtime`` (a server process: index, store, ingest path, job context,
  queue, arrival tracker), ``build_job_context`` (a worker process), ``start_scp``.
- ``datadir``: open an existing data directory, or create a new one (serve, migrate only).
- ``queue``: the producer side of the job queue (Celery by task name, or a local thread).
- ``forwarding``: C-STORE of a job's DICOM outputs to a PACS.

services/core never imports this package; api, scp, worker and cli do.
"""

from services.runtime.assembly import Runtime, build_job_context, build_runtime, start_scp
from services.runtime.datadir import DataDirMissing, open_index

__all__ = [
    "DataDirMissing",
    "Runtime",
    "build_job_context",
    "build_runtime",
    "open_index",
    "start_scp",
]
