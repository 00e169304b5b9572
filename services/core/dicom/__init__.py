"""DICOM Part 10 I/O, UIDs, image geometry and derived-object attributes."""
