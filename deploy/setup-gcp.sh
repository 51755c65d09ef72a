#!/usr/bin/env bash
# One-time set-up of a Google Cloud project for this repository (docs/deploy.md).
#
#   deploy/setup-gcp.sh --project my-project --github-owner me --github-repo fer2013-mlops \
#       [--region europe-west1] [--bucket my-project-fer] [--service fer-api] [--alert-email me@example.com] [--dry-run]
#
# Creates, each only if it does not exist yet (running it again changes nothing):
#   - the APIs it needs enabled;
#   - the Artifact Registry Docker repository (with a clean-up policy) for the api and train images;
#   - the GCS bucket (models under gs://BUCKET/models, data under gs://BUCKET/data);
#   - three service accounts with least privilege:
#       fer-runtime  the Cloud Run service: reads the bucket, writes logs, traces and metrics;
#       fer-build    Cloud Build: pushes images, deploys the service as fer-runtime, writes logs;
#       fer-train    the Vertex AI training job: reads and writes the bucket;
#   - the Cloud Build trigger that runs cloudbuild.yaml on every push to main (the GitHub
#     repository must first be connected to Cloud Build: docs/deploy.md, step 1);
#   - the alert policies in monitoring/alert-*.json and the dashboard, monitoring/dashboard.json,
#     rendered for --service by monitoring/render.py and sent to --alert-email when given.
# --dry-run prints every gcloud command instead of running it (on stdout, as '+ CMD'; the checks
# of what exists go to stderr as '? CMD' and are taken as "absent"), and needs neither gcloud
# nor credentials. Needs bash, python3 (to render and read the monitoring JSON) and gcloud, nothing else.
# Every option can also come from the environment: PROJECT_ID, REGION, REPOSITORY, BUCKET,
# SERVICE, GITHUB_OWNER, GITHUB_REPO, ALERT_EMAIL.
set -euo pipefail

ROOT="$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)"

PROJECT="${PROJECT_ID:-}"
REGION="${REGION:-europe-west1}"
REPOSITORY="${REPOSITORY:-fer}"
BUCKET="${BUCKET:-}"
SERVICE="${SERVICE:-fer-api}"
GITHUB_OWNER="${GITHUB_OWNER:-}"
GITHUB_REPO="${GITHUB_REPO:-}"
ALERT_EMAIL="${ALERT_EMAIL:-}"
TRIGGER="fer-main"
DRY_RUN=0

APIS=(
    run.googleapis.com
    artifactregistry.googleapis.com
    cloudbuild.googleapis.com
    storage.googleapis.com
    monitoring.googleapis.com
    logging.googleapis.com
    cloudtrace.googleapis.com
    aiplatform.googleapis.com
    iam.googleapis.com
)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

die() {
    printf 'setup-gcp.sh: %s\n' "$*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
        --region) REGION="${2:?--region needs a value}"; shift 2 ;;
        --repository) REPOSITORY="${2:?--repository needs a value}"; shift 2 ;;
        --bucket) BUCKET="${2:?--bucket needs a value}"; shift 2 ;;
        --service) SERVICE="${2:?--service needs a value}"; shift 2 ;;
        --github-owner) GITHUB_OWNER="${2:?--github-owner needs a value}"; shift 2 ;;
        --github-repo) GITHUB_REPO="${2:?--github-repo needs a value}"; shift 2 ;;
        --alert-email) ALERT_EMAIL="${2:?--alert-email needs a value}"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -n "$PROJECT" ]] || die "no project: pass --project PROJECT_ID (or set PROJECT_ID)"
[[ -n "$GITHUB_OWNER" && -n "$GITHUB_REPO" ]] ||
    die "no GitHub repository for the build trigger: pass --github-owner OWNER --github-repo NAME"
BUCKET="${BUCKET:-${PROJECT}-fer}"
# Before anything is created: the names end up in the monitoring files' strings and filters.
python3 "$ROOT/monitoring/render.py" --check --project "$PROJECT" --service "$SERVICE" ||
    die "--project or --service has characters the monitoring files cannot take"

if [[ "$DRY_RUN" -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login', or pass --dry-run to only print the commands"
fi
if [[ "$DRY_RUN" -eq 0 ]] && ! CLOUDSDK_CORE_DISABLE_PROMPTS=1 gcloud alpha monitoring policies create --help >/dev/null 2>&1; then
    die "the alert policies need gcloud's alpha and beta commands: gcloud components install alpha beta (Debian/Ubuntu packages: google-cloud-cli, which includes them)"
fi

# run CMD...: run it (echoed to stderr first), or with --dry-run print it as '+ CMD'.
run() {
    if [[ "$DRY_RUN" -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
        "$@"
    fi
}

# exists CMD...: whether a describe command succeeds; with --dry-run print it as '? CMD' (on
# stderr) and answer "no", so the commands that create things are printed too.
exists() {
    if [[ "$DRY_RUN" -eq 1 ]]; then
        { printf '?'; printf ' %q' "$@"; printf '\n'; } >&2
        return 1
    fi
    "$@" >/dev/null 2>&1
}

# query CMD...: the output of a read-only command; with --dry-run print it as '? CMD' (on
# stderr) and output nothing ("none found").
query() {
    if [[ "$DRY_RUN" -eq 1 ]]; then
        { printf '?'; printf ' %q' "$@"; printf '\n'; } >&2
        return 0
    fi
    "$@"
}

# json_field FILE FIELD: a top-level string field of a JSON file.
json_field() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

P=(--project="$PROJECT")
RUNTIME_SA="fer-runtime@${PROJECT}.iam.gserviceaccount.com"
BUILD_SA="fer-build@${PROJECT}.iam.gserviceaccount.com"
TRAIN_SA="fer-train@${PROJECT}.iam.gserviceaccount.com"

echo "== APIs" >&2
run gcloud services enable "${APIS[@]}" "${P[@]}"

echo "== Artifact Registry repository ${REGION}/${REPOSITORY}" >&2
if ! exists gcloud artifacts repositories describe "$REPOSITORY" --location="$REGION" "${P[@]}"; then
    run gcloud artifacts repositories create "$REPOSITORY" --repository-format=docker --location="$REGION" \
        --description="FER2013 service and training images" "${P[@]}"
fi
# Keeps storage (billed per GB) bounded: the 10 newest images of each, and nothing untagged.
run gcloud artifacts repositories set-cleanup-policies "$REPOSITORY" --location="$REGION" \
    --policy="$ROOT/deploy/artifact-cleanup-policy.json" --no-dry-run "${P[@]}"

echo "== Bucket gs://${BUCKET}" >&2
if ! exists gcloud storage buckets describe "gs://${BUCKET}" "${P[@]}"; then
    run gcloud storage buckets create "gs://${BUCKET}" --location="$REGION" --uniform-bucket-level-access \
        --public-access-prevention "${P[@]}"
fi

echo "== Service accounts" >&2
for name in fer-runtime fer-build fer-train; do
    if ! exists gcloud iam service-accounts describe "${name}@${PROJECT}.iam.gserviceaccount.com" "${P[@]}"; then
        run gcloud iam service-accounts create "$name" --display-name="FER2013 ${name#fer-}" "${P[@]}"
    fi
done

echo "== Roles (adding a binding that exists changes nothing)" >&2
# Project-level roles: these have no narrower resource to be granted on.
bind_project() {
    run gcloud projects add-iam-policy-binding "$PROJECT" --member="serviceAccount:$1" --role="$2" \
        --condition=None --quiet
}
# The service: reads models from the bucket only; writes its logs, traces and metrics.
run gcloud storage buckets add-iam-policy-binding "gs://${BUCKET}" \
    --member="serviceAccount:${RUNTIME_SA}" --role=roles/storage.objectViewer "${P[@]}"
bind_project "$RUNTIME_SA" roles/logging.logWriter
bind_project "$RUNTIME_SA" roles/cloudtrace.agent
bind_project "$RUNTIME_SA" roles/monitoring.metricWriter
# Training: reads data and publishes runs (and latest.json) in the bucket, nothing else.
run gcloud storage buckets add-iam-policy-binding "gs://${BUCKET}" \
    --member="serviceAccount:${TRAIN_SA}" --role=roles/storage.objectAdmin "${P[@]}"
# Cloud Build: pushes to this repository only; deploys the service (run.admin, not run.developer,
# because --allow-unauthenticated sets the service's IAM policy); may act as fer-runtime only.
run gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" --location="$REGION" \
    --member="serviceAccount:${BUILD_SA}" --role=roles/artifactregistry.writer "${P[@]}"
bind_project "$BUILD_SA" roles/run.admin
bind_project "$BUILD_SA" roles/logging.logWriter
run gcloud iam service-accounts add-iam-policy-binding "$RUNTIME_SA" \
    --member="serviceAccount:${BUILD_SA}" --role=roles/iam.serviceAccountUser "${P[@]}"

echo "== Cloud Build trigger ${TRIGGER} (push to main of ${GITHUB_OWNER}/${GITHUB_REPO})" >&2
if ! exists gcloud builds triggers describe "$TRIGGER" "${P[@]}"; then
    run gcloud builds triggers create github --name="$TRIGGER" \
        --repo-owner="$GITHUB_OWNER" --repo-name="$GITHUB_REPO" --branch-pattern='^main$' \
        --build-config=cloudbuild.yaml \
        --service-account="projects/${PROJECT}/serviceAccounts/${BUILD_SA}" \
        --substitutions="_REGION=${REGION},_REPOSITORY=${REPOSITORY},_SERVICE=${SERVICE},_BUCKET=${BUCKET}" \
        --description="test, build, push, deploy ${SERVICE}, smoke test" "${P[@]}"
fi

echo "== Alerts" >&2
channel_id=""
if [[ -n "$ALERT_EMAIL" ]]; then
    channel="$(query gcloud beta monitoring channels list \
        --filter="type=\"email\" AND labels.email_address=\"${ALERT_EMAIL}\"" --format='value(name)' "${P[@]}")"
    channel="${channel%%$'\n'*}"  # the first, if several
    if [[ -z "$channel" ]]; then
        if [[ "$DRY_RUN" -eq 1 ]]; then
            run gcloud beta monitoring channels create --type=email --display-name="FER2013 alerts (${ALERT_EMAIL})" \
                --channel-labels="email_address=${ALERT_EMAIL}" --format='value(name)' "${P[@]}"
            channel="projects/${PROJECT}/notificationChannels/CHANNEL_ID"
        else
            channel="$(run gcloud beta monitoring channels create --type=email \
                --display-name="FER2013 alerts (${ALERT_EMAIL})" \
                --channel-labels="email_address=${ALERT_EMAIL}" --format='value(name)' "${P[@]}")"
        fi
    fi
    channel_id="${channel##*/}"
    [[ -n "$channel_id" ]] || die "no notification channel for ${ALERT_EMAIL}: the alerts would notify no one"
fi
# The committed files name the service fer-api and a placeholder channel: monitoring/render.py
# writes this project's copies (kept after --dry-run, for a look; removed after a real run).
rendered="$(python3 "$ROOT/monitoring/render.py" --project "$PROJECT" --service "$SERVICE" --channel-id "$channel_id")"
if [[ "$DRY_RUN" -eq 1 ]]; then
    echo "the rendered alert policies and dashboard: $rendered" >&2
else
    trap 'python3 -c "import shutil, sys; shutil.rmtree(sys.argv[1])" "$rendered"' EXIT
fi
for policy in "$ROOT"/monitoring/alert-*.json; do  # the committed ones, rendered
    file="$rendered/${policy##*/}"
    name="$(json_field "$file" displayName)"
    existing="$(query gcloud alpha monitoring policies list --filter="displayName=\"${name}\"" \
        --format='value(name)' "${P[@]}")"
    if [[ -z "$existing" ]]; then
        run gcloud alpha monitoring policies create --policy-from-file="$file" "${P[@]}"
    else
        echo "alert policy '${name}' exists: ${existing}" >&2
    fi
done
name="$(json_field "$rendered/dashboard.json" displayName)"
existing="$(query gcloud monitoring dashboards list --filter="displayName=\"${name}\"" \
    --format='value(name)' "${P[@]}")"
if [[ -z "$existing" ]]; then
    run gcloud monitoring dashboards create --config-from-file="$rendered/dashboard.json" "${P[@]}"
fi

printf '%s\n' "== Done. Next (docs/deploy.md):" \
    "  gcloud builds triggers run ${TRIGGER} --branch=main ${P[*]}" \
    "  gcloud storage cp fer2013.zip gs://${BUCKET}/data/fer2013.zip" >&2
