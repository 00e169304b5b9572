"""Retrieving stored instances (the core of WADO-RS, PS3.18 10.4), one concern per module.

- ``lookup``: find stored instances in the index and read their files
- ``negotiation``: what the client accepts (Accept header) against what can be sent
- ``transcoding``: whole instances in another transfer syntax
- ``frames``: cut and decode frames
- ``bulkdata``: Pixel Data and other binary values as bulk data
- ``metadata``: the dataset for WADO-RS metadata, without reading Pixel Data
- ``windowing``: the VOI transforms (PS3.3 C.11) to values in 0..1
- ``rendering``: rendered images and thumbnails (PNG, JPEG)
- ``errors``: what the query or the Accept header got wrong

Transfer syntaxes offered for whole instances: as stored (``transfer-syntax=*``), Explicit VR
Little Endian (the default: compressed instances are decompressed), JPEG 2000 lossless (4.90)
and JPEG 2000 (4.91), or any syntax every requested instance is already stored in. JPEG 2000 is
made with crgate's own OpenJPEG codec, always reversibly: a 4.91 request with no compression
ratio gets a reversible (lossless) codestream labelled 4.91, which that syntax allows, so a
retrieve never silently discards information. Lossy output is the transcode pipeline's job.

Frames go out as ``application/octet-stream`` (uncompressed, little endian, or with
``transfer-syntax=*`` the stored fragments as they are, whatever the codec) or ``image/jp2`` (a
JPEG 2000 codestream: the stored fragments when the instance is stored as JPEG 2000).
"""
