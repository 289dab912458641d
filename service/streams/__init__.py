"""Live streams: cameras over RTSP and MJPEG over HTTP, detected, tracked and counted."""
