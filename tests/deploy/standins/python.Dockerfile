# Test-only stand-in for python:3.11-slim-bookworm, for machines that cannot pull images: Debian
# bookworm's Python 3.11 on a debootstrap root file system imported as DEBIAN_IMAGE. It trusts
# the build machine's CA bundle (ca-certificates.crt in the build context), which HTTPS from
# these machines needs; that belongs to this stand-in only, never to the project's images.
ARG DEBIAN_IMAGE=ssd300-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
       libpython3.11 ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && ln -s /usr/bin/python3 /usr/local/bin/python \
    && ln -s /usr/bin/pip3 /usr/local/bin/pip
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
