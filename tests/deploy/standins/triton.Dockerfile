# Test-only stand-in for nvcr.io/nvidia/tritonserver:24.10-py3 (Triton 2.51): the same release's
# tritonserver from nvidia-pytriton, with the Python backend only (no GPU, no ONNX Runtime or
# PyTorch backends), so it serves the export's ssd300_python model. ONNX Runtime and numpy are
# what that model's model.py imports. `tritonserver` is on the PATH, with its backends as the
# default, so docker-compose.yml's command runs unchanged.
ARG PYTHON_IMAGE=ssd300-standin/python:3.11
FROM ${PYTHON_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
ARG PYTRITON=0.7.0
ARG ONNXRUNTIME=1.32.0
RUN pip install --no-cache-dir "nvidia-pytriton==${PYTRITON}" "onnxruntime==${ONNXRUNTIME}" "numpy<2" \
    && home=$(python -c "import pathlib, pytriton; print(pathlib.Path(pytriton.__file__).parent / 'tritonserver')") \
    && cp "$home/python_backend_stubs/3.11/triton_python_backend_stub" "$home/backends/python/" \
    && libs=$(dirname "$(dirname "$home")")/nvidia_pytriton.libs \
    && printf '#!/bin/sh\nexport LD_LIBRARY_PATH=%s:$LD_LIBRARY_PATH\nexec %s/bin/tritonserver --backend-directory=%s/backends "$@"\n' \
       "$libs" "$home" "$home" > /usr/local/bin/tritonserver \
    && chmod +x /usr/local/bin/tritonserver
