"""crgate: JPEG 2000 compression-and-inference gateway for radiology."""
