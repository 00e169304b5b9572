"""crgate's DICOM edge (pynetdicom): the SCP server (server.py), its event handlers (handlers.py)
and the streaming of received data sets into the store's staging area (staging.py)."""
