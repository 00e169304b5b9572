"""The gateway's domain, framework-free: codecs, DICOM, the index, ingest, policies, jobs,
classification, inference, metrics.

Nothing here imports fastapi, celery, pynetdicom, matplotlib, torch, ``models`` or the lab
(tests/test_structure.py checks it); the edges and services/runtime build on it.
"""
