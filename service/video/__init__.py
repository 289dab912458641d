"""Video files: decoding (PyAV, in a worker process), tracking, line counting, the NDJSON answer."""
