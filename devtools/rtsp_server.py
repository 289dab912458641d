"""An RTSP server playing a clip (H.264 in MP4) to every client from its start: GStreamer's RTSP
server through Debian's python3-gi (``apt-get install python3-gi gir1.2-gst-rtsp-server-1.0
gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad``), what the stream
tests connect to as a camera.

Run with Debian's own Python (the GObject bindings are not in the venv):
``/usr/bin/python3 devtools/rtsp_server.py PORT CLIP.mp4`` serves ``rtsp://127.0.0.1:PORT/live``
and prints ``ready`` once listening. From Python: :func:`rtsp_camera`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"


def available() -> str | None:
    """Why the server cannot run here, or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return "no /usr/bin/python3"
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import gi; gi.require_version('GstRtspServer', '1.0')"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return "GStreamer's RTSP server is not installed (make system-deps installs it)"
    return None


@contextlib.contextmanager
def rtsp_camera(clip: Path, port: int, log: Path | None = None) -> Iterator[subprocess.Popen]:
    """The server as a child process, ready; killed (SIGKILL: a camera's power cut) at the end
    unless the caller did so."""
    proc = start(clip, port, log)
    try:
        yield proc
    finally:
        stop(proc)


def start(clip: Path, port: int, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, __file__, str(port), str(clip)],
        stdout=subprocess.PIPE,
        stderr=out,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if b"ready" not in line:
        stop(proc)
        raise RuntimeError(f"the RTSP server did not start (see {log})")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def serve(port: int, clip: Path) -> None:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( filesrc location={clip} ! qtdemux ! h264parse "
        "! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    factory.set_shared(False)  # every client sees the clip from its first frame
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    serve(int(sys.argv[1]), Path(sys.argv[2]).resolve())
