"""Framework-free domain code: codecs, DICOM, metrics, phantoms, pipeline use cases.

Nothing here imports fastapi, celery or pynetdicom.
"""
