#!/bin/sh
# Publishes the versions of a model repository written by `python -m training.export --output DIR`
# to S3, for the Helm chart's `model.repository.kind: s3`, in the order that keeps a rollout free
# of failed requests:
#   1. every version's class list and labels (and the models' config.pbtxt),
#   2. its metadata.json: the gateways' sync sidecars copy a version once that is there,
#   3. after one sync period of the sidecars (WAIT_S), the model files, which Triton loads:
#      by then every gateway can label the new version's detections.
# Versions already in S3 are left as they are; nothing is deleted (a rollback is
# `aws s3 rm --recursive s3://BUCKET/PREFIX/MODEL/N/`). Staging folders of exports in progress
# are not published.
#
# usage: deploy/s3_publish.sh DIR s3://BUCKET/PREFIX
# env:   ENDPOINT  an S3-compatible store's URL (MinIO ...), as the chart's s3.endpoint
#        WAIT_S    seconds between 2 and 3: the chart's s3.syncSeconds plus a margin (35)
set -eu
[ $# -eq 2 ] || { echo "usage: $0 DIR s3://BUCKET/PREFIX" >&2; exit 2; }
dir=$1
dest=${2%/}
[ -d "$dir" ] || { echo "$0: $dir is not a folder" >&2; exit 2; }
case $dest in s3://?*) ;; *) echo "$0: $dest is not an s3:// URL" >&2; exit 2 ;; esac
endpoint=${ENDPOINT:+--endpoint-url $ENDPOINT}

sync() {  # aws s3 sync of DIR to DEST with filters, never of unfinished exports
  aws s3 sync $endpoint --only-show-errors "$@" \
    --exclude '*/.staging-*' --exclude '*/.retired-*' "$dir" "$dest"
}

sync --exclude '*' --include '*.txt' --include '*.pbtxt' --include '*/classes.json'
sync --exclude '*' --include '*/metadata.json'
echo "class lists and metadata published; the model files follow in ${WAIT_S:-35} s"
sleep "${WAIT_S:-35}"
sync
echo "published $dir to $dest"
