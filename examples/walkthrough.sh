#!/usr/bin/env bash
# The README's curl walkthrough as a script: create a workflow, upload the demo data, choose the demo
# pipeline, set its arguments, schedule it, follow it to the end and download its results.
#   examples/walkthrough.sh [server URL] [token file] [download folder (default: a new temp folder)]
# Works with curl 7.61 (RHEL 8) and newer.
set -euo pipefail
API=${1:-http://127.0.0.1:8000}/api
TOKEN=${NFAPI_TOKEN:-$(cat "${2:-nfapi-data/api-token}")}
OUT=${3:-$(mktemp -d)}
DATA=$(dirname "$0")/demo/data
auth=(-H "Authorization: Bearer $TOKEN")

# curl that prints the answer and fails on an HTTP error status, as --fail-with-body does (curl 7.76+).
call() {
  local answer status
  answer=$(curl -sS -w '\n%{http_code}' "${auth[@]}" "$@") || return
  status=${answer##*$'\n'}
  printf '%s\n' "${answer%$'\n'*}"
  if [ "$status" -ge 400 ]; then
    echo "walkthrough: HTTP $status from $*" >&2
    return 22
  fi
}
# field KEY...: the value under those keys in the JSON on stdin
field() {
  python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[key]
print(value)' "$@"
}

# 1. create a workflow
id=$(call -d '{"name": "walkthrough"}' "$API/workflows/create" | field workflow id)
echo "created workflow $id"

# 2. upload input files
call -F "file=@$DATA/reference.fa" -F directory= "$API/workflows/$id/upload-file"
for f in "$DATA"/reads/*.fastq; do
  call -F "file=@$f" -F directory=reads "$API/workflows/$id/upload-file"
done
call "$API/workflows/$id/files?dir=reads"

# 3. choose a pipeline and look at its arguments
call "$API/nextflow-workflows"
call "$API/nextflow-workflows/Hello%20World%20(Local)/arguments" >/dev/null

# 4. set the arguments
call -d '{"nextflow_workflow": "Hello World (Local)",
  "nextflow_arguments": {"reference": "reference.fa", "extra_files": ["reference.fa"],
                         "reads": "reads/*.fastq", "min_length": 20, "title": "first try"}}' \
  "$API/workflows/$id/update"

# 5. schedule it, and follow it to the end
run=$(call -X POST "$API/workflows/$id/schedule" | field run id)
echo "scheduled run $run"
while :; do
  status=$(call "$API/workflows/$id" | field workflow status)
  echo "status: $status"
  case "$status" in succeeded|failed|cancelled|lost) break;; esac
  sleep 1
done
call "$API/workflows/$id/log?run=$run"
call "$API/workflows/$id/runs/$run/tasks?status=completed"

# download the results: a file (resumable), and the folder as zip and as tar.gz
mkdir -p "$OUT"
call -C - -o "$OUT/summary.txt" "$API/workflows/$id/download?path=results/summary.txt" >/dev/null
call -o "$OUT/results.zip" "$API/workflows/$id/download?path=results" >/dev/null
call -o "$OUT/results.tar.gz" "$API/workflows/$id/download?path=results&format=tar.gz" >/dev/null
echo "downloaded into $OUT:"
ls "$OUT"
echo "run $run of workflow $id: $status"
[ "$status" = succeeded ]
