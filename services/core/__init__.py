"""Framework-free domain code: codecs, DICOM, metrics, pipeline use cases.

Nothing here imports fastapi, celery, pynetdicom, matplotlib, torch, ``models`` or the research
code in :mod:`services.lab`.
"""
