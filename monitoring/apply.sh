#!/usr/bin/env bash
# Create or update the alert policies and the dashboard of this folder in a Google Cloud project.
#
#   PROJECT_ID=my-project CHANNEL_ID=1234567890 monitoring/apply.sh
#   PROJECT_ID=my-project SERVICE=fer-api-staging monitoring/apply.sh   # no CHANNEL_ID: no notifications
#
# The files hold placeholders: PROJECT_ID and CHANNEL_ID in the notification channel's name,
# and the Cloud Run service name fer-api. This script substitutes them into copies (the files
# stay as committed), then creates each policy, or updates the one with the same display name,
# and the same for the dashboard. DRY_RUN=1 only writes the rendered files to OUT_DIR.
#
# Alert policies are on gcloud's alpha track only (`gcloud alpha monitoring policies`, checked
# with gcloud 528); dashboards are GA (`gcloud monitoring dashboards`). tests/test_monitoring.py
# checks every command line this script runs against the installed gcloud.
set -euo pipefail

: "${PROJECT_ID:?set PROJECT_ID to the Google Cloud project}"
SERVICE="${SERVICE:-fer-api}"
CHANNEL_ID="${CHANNEL_ID:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT_DIR:-$(mktemp -d)}"
mkdir -p "$out"

for value in "$PROJECT_ID" "$SERVICE" "$CHANNEL_ID"; do
  # Only characters that are safe inside the sed expressions and JSON strings below.
  if [[ ! "$value" =~ ^[A-Za-z0-9_.:-]*$ ]]; then
    echo "apply.sh: unexpected characters in '$value'" >&2
    exit 2
  fi
done

render() {  # render SRC DEST
  if [[ -n "$CHANNEL_ID" ]]; then
    sed -e "s|projects/PROJECT_ID/notificationChannels/CHANNEL_ID|projects/$PROJECT_ID/notificationChannels/$CHANNEL_ID|" \
      -e "s/fer-api/$SERVICE/g" "$1" >"$2"
  else  # the placeholder sits alone on its line: deleting it leaves "notificationChannels": []
    sed -e "/notificationChannels\/CHANNEL_ID/d" -e "s/fer-api/$SERVICE/g" "$1" >"$2"
  fi
}

display_name() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["displayName"])' "$1"
}

for src in "$here"/alert-*.json; do
  dest="$out/$(basename "$src")"
  render "$src" "$dest"
  [[ -n "${DRY_RUN:-}" ]] && continue
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
render "$here/dashboard.json" "$dest"
if [[ -z "${DRY_RUN:-}" ]]; then
  name="$(display_name "$dest")"
  existing="$(gcloud monitoring dashboards list --project="$PROJECT_ID" \
    --filter="displayName=\"$name\"" --format="value(name)" | head -n 1)"
  if [[ -n "$existing" ]]; then
    gcloud monitoring dashboards update "$existing" --project="$PROJECT_ID" --config-from-file="$dest"
  else
    gcloud monitoring dashboards create --project="$PROJECT_ID" --config-from-file="$dest"
  fi
fi
echo "rendered files in $out"
