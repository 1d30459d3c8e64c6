#!/usr/bin/env bash
# The README's curl walkthrough as a script: create a workflow, upload the demo data, choose the
# demo pipeline, set its arguments, schedule it and follow it to the end.
#   examples/walkthrough.sh [server URL] [token file]
set -euo pipefail
API=${1:-http://127.0.0.1:8000}/api
TOKEN=${NFAPI_TOKEN:-$(cat "${2:-nfapi-data/api-token}")}
DATA=$(dirname "$0")/demo/data
auth=(-sS --fail-with-body -H "Authorization: Bearer $TOKEN")

id=$(curl "${auth[@]}" -d '{"name": "walkthrough"}' "$API/workflows/create" | python3 -c 'import json,sys; print(json.load(sys.stdin)["workflow"]["id"])')
echo "created workflow $id"
curl "${auth[@]}" -F "file=@$DATA/reference.fa" -F directory= "$API/workflows/$id/upload-file"; echo
for f in "$DATA"/reads/*.fastq; do
  curl "${auth[@]}" -F "file=@$f" -F directory=reads "$API/workflows/$id/upload-file"; echo
done
curl "${auth[@]}" -d '{"nextflow_workflow": "Hello World (Local)", "nextflow_arguments": {
  "reference": "reference.fa", "extra_files": ["reads/sample1.fastq"], "reads": "reads/*.fastq",
  "min_length": 20, "title": "walkthrough"}}' "$API/workflows/$id/update"; echo
curl "${auth[@]}" -X POST "$API/workflows/$id/schedule"; echo
while :; do
  wf=$(curl "${auth[@]}" "$API/workflows/$id")
  status=$(echo "$wf" | python3 -c 'import json,sys; w=json.load(sys.stdin)["workflow"]; print(w["status"], w["completed_processes"], "/", w["submitted_processes"])')
  echo "status: $status"
  case "$status" in succeeded*|failed*|cancelled*|lost*) break;; esac
  sleep 1
done
echo "$wf" | python3 -m json.tool
