#!/bin/sh
# Publishes the new versions of a model repository written by `python -m training.export
# --output DIR` to S3, for the Helm chart's `model.repository.kind: s3`, so that no request
# fails on the way:
#   1. each new version's class list, labels and metadata go to MODEL/.next-N/, where Triton
#      does not look and the gateways' sync sidecars do;
#   2. after one sync period of the sidecars (WAIT_S) every gateway can label version N;
#   3. its model file goes to MODEL/N/: one object, which S3 shows whole or not at all, so the
#      first time Triton's polling sees version N it is complete (a version Triton finds
#      incomplete is not loaded when the rest arrives: tritonserver 2.51);
#   4. its small files follow into MODEL/N/ and MODEL/.next-N/ is removed.
# Formats with one model file only (onnx, onnx_int8, torchscript); the python format's two
# files cannot appear at once. Versions already in S3 are left alone; nothing else is deleted
# (a rollback is `aws s3 rm --recursive s3://BUCKET/PREFIX/MODEL/N/`).
#
# usage: deploy/s3_publish.sh DIR s3://BUCKET/PREFIX
# env:   ENDPOINT  an S3-compatible store's URL (MinIO ...), as the chart's s3.endpoint
#        WAIT_S    seconds for step 2: the chart's s3.syncSeconds plus a margin (35)
set -eu
[ $# -eq 2 ] || { echo "usage: $0 DIR s3://BUCKET/PREFIX" >&2; exit 2; }
dir=${1%/}
dest=${2%/}
[ -d "$dir" ] || { echo "$0: $dir is not a folder" >&2; exit 2; }
case $dest in s3://?*) ;; *) echo "$0: $dest is not an s3:// URL" >&2; exit 2 ;; esac
endpoint=${ENDPOINT:+--endpoint-url $ENDPOINT}
s3() { aws $endpoint --only-show-errors s3 "$@"; }

new=""
for version_dir in "$dir"/*/[0-9]*; do
  [ -f "$version_dir/metadata.json" ] || continue  # not written to the end
  model=$(basename "$(dirname "$version_dir")"); version=$(basename "$version_dir")
  files=$(cd "$version_dir" && ls model.* 2>/dev/null || true)
  [ "$(echo "$files" | wc -w)" -eq 1 ] || {
    echo "$0: $version_dir has model files '$files': one is needed (not the python format)" >&2
    exit 2
  }
  if aws $endpoint s3 ls "$dest/$model/$version/$files" >/dev/null 2>&1; then
    continue  # published already
  fi
  for name in classes.json labels.txt metadata.json; do  # metadata.json last
    s3 cp "$version_dir/$name" "$dest/$model/.next-$version/$name"
  done
  new="$new $model/$version/$files"
done
[ -n "$new" ] || { echo "nothing new in $dir"; exit 0; }
s3 sync --exclude '*' --include '*/config.pbtxt' "$dir" "$dest"  # changed configs only
echo "labels of$new published; the model files follow in ${WAIT_S:-35} s"
sleep "${WAIT_S:-35}"
for item in $new; do
  model=${item%%/*}; rest=${item#*/}; version=${rest%%/*}; file=${rest#*/}
  s3 cp "$dir/$model/$version/$file" "$dest/$model/$version/$file"
  for name in classes.json labels.txt metadata.json; do
    s3 cp "$dir/$model/$version/$name" "$dest/$model/$version/$name"
  done
  s3 rm --recursive "$dest/$model/.next-$version/"
done
echo "published$new to $dest"
