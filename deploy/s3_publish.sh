#!/bin/sh
# Publishes the new versions of a model repository written by `python -m training.export
# --output DIR` to S3, for the Helm chart's `model.repository.kind: s3`, so that no request
# fails on the way:
#   1. each new version's class list, labels and metadata go to MODEL/.next-N/, where Triton
#      does not look and the gateways' sync sidecars do;
#   2. it waits WAIT_S, two sync periods of the sidecars and a margin, for every gateway to
#      have copied them;
#   3. its model file goes to MODEL/N/: one object, which S3 shows whole or not at all, so the
#      first time Triton's polling sees version N it is complete (a version Triton finds
#      incomplete is not loaded when the rest arrives: tritonserver 2.51);
#   4. its small files follow into MODEL/N/ (metadata.json last: published), and
#      MODEL/.next-N/ is removed.
# Formats with one model file only (onnx, onnx_int8, torchscript): the python format's two
# files cannot appear at once, so its versions are skipped (said on stderr); with nothing else to
# publish it stops before uploading anything (exit 2). Only a 404 means an object is absent: any
# other error of S3 stops the publish with its message (exit 3). Versions already in S3 are left alone; a rerun after a failure
# finishes what it left. A model's config.pbtxt goes with its first version; a changed one is
# refused. A version rolled back with
#   aws s3 rm --recursive s3://BUCKET/PREFIX/MODEL/N/ &&
#   aws s3 cp - s3://BUCKET/PREFIX/MODEL/.retired-N </dev/null
# is not published again. A version's identity is its metadata.json (its files' digests), not
# its number: where S3 holds version N of another export (MODEL/N/metadata.json differs), the
# publish stops before uploading anything (exit 2); a MODEL/.next-N/ of another export (a publish
# that stopped in its wait: Triton never saw it) is replaced, and the sidecars replace their copy.
#
# usage: deploy/s3_publish.sh DIR s3://BUCKET/PREFIX
# It checks DIR first (python -m ssdcore.repository --check, what training.export --check runs):
# a half-copied version, a file that differs from its metadata or an inconsistent class list
# stops it before anything is uploaded (exit 2).
# env:   ENDPOINT  an S3-compatible store's URL (MinIO ...), as the chart's s3.endpoint
#        PYTHON    the Python with numpy that runs the check (python3)
#        WAIT_S    seconds for step 2: twice the chart's s3.syncSeconds plus a margin (65)
set -eu
[ $# -eq 2 ] || { echo "usage: $0 DIR s3://BUCKET/PREFIX" >&2; exit 2; }
dir=${1%/}
dest=${2%/}
[ -d "$dir" ] || { echo "$0: $dir is not a folder" >&2; exit 2; }
case $dest in s3://?*) ;; *) echo "$0: $dest is not an s3:// URL" >&2; exit 2 ;; esac
endpoint=${ENDPOINT:+--endpoint-url $ENDPOINT}
s3() { aws $endpoint --only-show-errors s3 "$@"; }
bucket=${dest#s3://}; bucket=${bucket%%/*}
root=${dest#s3://"$bucket"}; root=${root#/}; root=${root:+$root/}
exists() {  # one object, by its exact key under DEST: present, or absent (404 only); any
  # other answer (403, throttling, the network) stops the publish: taken for "absent", it would
  # publish a rolled-back version again or skip the changed-config check
  if said=$(aws $endpoint s3api head-object --bucket "$bucket" --key "$root$1" 2>&1 >/dev/null); then
    return 0
  fi
  case $said in *"(404)"*|*"Not Found"*|*NoSuchKey*) return 1 ;; esac
  echo "$0: cannot tell whether s3://$bucket/$root$1 exists, nothing more is published: $said" >&2
  exit 3
}
small="classes.json labels.txt metadata.json"  # metadata.json last: the version is whole
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
# the repository checked first (every version complete, files as recorded, classes consistent)
here=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" -m ssdcore.repository \
  --check "$dir" >"$tmp/check" || {
  grep WRONG "$tmp/check" >&2
  echo "$0: $dir failed its check (python -m training.export --check): nothing published" >&2
  exit 2
}

# what can be published, decided before anything is uploaded: a version of one model file (the
# export's default formats include the python one, whose two files cannot appear at once: its
# versions are skipped, said on stderr)
publishable=""; skipped=0
for version_dir in "$dir"/*/[0-9]*; do
  [ -f "$version_dir/metadata.json" ] || continue  # not written to the end
  set -- "$version_dir"/model.*
  if [ $# -eq 1 ] && [ -f "$1" ]; then
    publishable="$publishable $version_dir"
  else
    echo "$0: skipped $version_dir: model files '$*': one is needed (not the python format)" >&2
    skipped=$((skipped + 1))
  fi
done
if [ -z "$publishable" ] && [ "$skipped" -gt 0 ]; then
  echo "$0: nothing in $dir can be published (export --formats onnx, onnx_int8 or torchscript)" >&2
  exit 2
fi

differs() {  # $1: a metadata.json key under DEST, $2: the local one; 0 when S3's differs
  aws $endpoint s3 cp "$dest/$1" "$tmp/remote.json" --only-show-errors || {
    echo "$0: cannot read s3://$bucket/$root$1, nothing is published" >&2
    exit 3
  }
  ! cmp -s "$tmp/remote.json" "$2"
}
# versions already in S3 must be these very versions, and configs the same: checked before
# anything is uploaded
configs_checked=""
for version_dir in $publishable; do
  model=$(basename "$(dirname "$version_dir")"); version=$(basename "$version_dir")
  exists "$model/.retired-$version" && continue
  for key in "$model/$version/metadata.json" "$model/.next-$version/metadata.json"; do
    if [ "$key" = "$model/.next-$version/metadata.json" ]; then  # replaced, unless its
      set -- "$version_dir"/model.*  # model file is in MODEL/N/ already (Triton may serve it)
      exists "$model/$version/$(basename "$1")" || continue
    fi
    if exists "$key" && differs "$key" "$version_dir/metadata.json"; then
      echo "$0: version $version of $model in S3 is another export (s3: $key differs from" \
        "$version_dir/metadata.json): version numbers are not reused. Export into the" \
        "repository that published it (its numbers go on from the highest), or retire" \
        "$version in S3 first; nothing published" >&2
      exit 2
    fi
  done
  # a model's config goes with its first version only: a changed one is refused before any
  # upload (a .next-N/ uploaded first would be copied by every sidecar and never served)
  exists "$model/$version/metadata.json" && continue
  case " $configs_checked " in *" $model "*) continue ;; esac
  configs_checked="$configs_checked $model"
  if exists "$model/config.pbtxt"; then
    aws $endpoint s3 cp "$dest/$model/config.pbtxt" "$tmp/config.pbtxt" --only-show-errors || {
      echo "$0: cannot read s3://$bucket/$root$model/config.pbtxt, nothing is published" >&2
      exit 3
    }
    cmp -s "$tmp/config.pbtxt" "$dir/$model/config.pbtxt" || {
      echo "$0: $dir/$model/config.pbtxt differs from the one in S3: a model's config is not" \
        "changed under running servers (deploy it as a new model, or replace it yourself);" \
        "nothing published" >&2
      exit 2
    }
  fi
done

new=""; finish=""
for version_dir in $publishable; do
  model=$(basename "$(dirname "$version_dir")"); version=$(basename "$version_dir")
  set -- "$version_dir"/model.*
  file=$(basename "$1")
  if exists "$model/.retired-$version"; then
    echo "$model/$version was rolled back (s3: $model/.retired-$version): not published again"
    continue
  fi
  exists "$model/$version/metadata.json" && continue  # published already
  if exists "$model/$version/$file"; then  # an earlier run stopped after the model file
    finish="$finish $model/$version/$file"
    continue
  fi
  for name in $small; do
    s3 cp "$version_dir/$name" "$dest/$model/.next-$version/$name"
  done
  new="$new $model/$version/$file"
done
[ -n "$new$finish" ] || { echo "nothing new in $dir"; exit 0; }
for item in $new; do  # a model's config goes with its first version only (checked above)
  model=${item%%/*}
  exists "$model/config.pbtxt" || s3 cp "$dir/$model/config.pbtxt" "$dest/$model/config.pbtxt"
done
if [ -n "$new" ]; then
  echo "labels of$new published; the model files follow in ${WAIT_S:-65} s"
  sleep "${WAIT_S:-65}"
fi
for item in $new $finish; do
  model=${item%%/*}; rest=${item#*/}; version=${rest%%/*}; file=${rest#*/}
  case " $finish " in *" $item "*) ;; *) s3 cp "$dir/$model/$version/$file" "$dest/$item" ;; esac
  for name in $small; do
    s3 cp "$dir/$model/$version/$name" "$dest/$model/$version/$name"
  done
  s3 rm --recursive "$dest/$model/.next-$version/"
done
echo "published$new$finish to $dest"
