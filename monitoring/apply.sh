#!/usr/bin/env bash
# Create or update the alert policies and the dashboard of this folder in a Google Cloud project.
#
#   PROJECT_ID=my-project CHANNEL_ID=1234567890 monitoring/apply.sh
#   PROJECT_ID=my-project SERVICE=fer-api-staging monitoring/apply.sh   # no CHANNEL_ID: no notifications
#
# The files hold placeholders: PROJECT_ID and CHANNEL_ID in the notification channel's name,
# and the Cloud Run service name fer-api. render.py substitutes them into copies (the files stay
# as committed), then this script creates each policy, or updates the one with the same display
# name, and the same for the dashboard. DRY_RUN=1 only writes the rendered files to OUT_DIR.
#
# Alert policies are on gcloud's alpha track only (`gcloud alpha monitoring policies`, checked
# with gcloud 528); dashboards are GA (`gcloud monitoring dashboards`). tests/test_monitoring.py
# checks every command line this script runs against the installed gcloud.
set -euo pipefail

: "${PROJECT_ID:?set PROJECT_ID to the Google Cloud project}"
SERVICE="${SERVICE:-fer-api}"
CHANNEL_ID="${CHANNEL_ID:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(python3 "$here/render.py" --project "$PROJECT_ID" --service "$SERVICE" --channel-id "$CHANNEL_ID" \
  ${OUT_DIR:+--out-dir "$OUT_DIR"})"

display_name() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["displayName"])' "$1"
}

if [[ -n "${DRY_RUN:-}" ]]; then
  echo "rendered files in $out"
  exit 0
fi

for src in "$here"/alert-*.json; do  # the committed ones: not whatever else OUT_DIR holds
  dest="$out/${src##*/}"
  name="$(display_name "$dest")"
  existing="$(gcloud alpha monitoring policies list --project="$PROJECT_ID" \
    --filter="displayName=\"$name\"" --format="value(name)" | head -n 1)"
  if [[ -n "$existing" ]]; then
    gcloud alpha monitoring policies update "$existing" --project="$PROJECT_ID" --policy-from-file="$dest"
  else
    gcloud alpha monitoring policies create --project="$PROJECT_ID" --policy-from-file="$dest"
  fi
done

dest="$out/dashboard.json"
name="$(display_name "$dest")"
existing="$(gcloud monitoring dashboards list --project="$PROJECT_ID" \
  --filter="displayName=\"$name\"" --format="value(name)" | head -n 1)"
if [[ -n "$existing" ]]; then
  gcloud monitoring dashboards update "$existing" --project="$PROJECT_ID" --config-from-file="$dest"
else
  gcloud monitoring dashboards create --project="$PROJECT_ID" --config-from-file="$dest"
fi
echo "rendered files in $out"
