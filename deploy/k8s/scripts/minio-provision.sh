#!/bin/sh
# One-shot MinIO provisioning (compose: minio-init; Kubernetes: Job minio-provision), run with the MinIO image's own
# `mc` as the root user, which nothing else holds: the bucket (versioned), then one user per client, each with a
# policy confined to its own prefix of the bucket:
#
#   MLflow server (proxied artifacts)   MLFLOW_S3_ACCESS_KEY / MLFLOW_S3_SECRET_KEY   s3://$FIGAN_BUCKET/mlflow/
#   worker + explanation Jobs (DVC)     WORKER_S3_ACCESS_KEY / WORKER_S3_SECRET_KEY   s3://$FIGAN_BUCKET/dvc/
#
# Idempotent: re-running updates the secrets and policies. POSIX sh: the MinIO image has no Python.
set -eu

: "${MINIO_URL:=http://minio:9000}"
: "${FIGAN_BUCKET:?}" "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}"
: "${MLFLOW_S3_ACCESS_KEY:?}" "${MLFLOW_S3_SECRET_KEY:?}" "${WORKER_S3_ACCESS_KEY:?}" "${WORKER_S3_SECRET_KEY:?}"

work="$(mktemp -d "${TMPDIR:-/tmp}/minio-provision.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mcx() { mc --config-dir "$work/mc" "$@"; }

# policy_json PREFIX: list, read, write and delete under s3://BUCKET/PREFIX/ and nothing else (GetBucketLocation
# lets s3fs/DVC see that the bucket exists without listing it)
policy_json() {
    printf '{"Version":"2012-10-17","Statement":[%s,%s,%s]}\n' \
        "{\"Effect\":\"Allow\",\"Action\":[\"s3:GetBucketLocation\"],\"Resource\":[\"arn:aws:s3:::$FIGAN_BUCKET\"]}" \
        "{\"Effect\":\"Allow\",\"Action\":[\"s3:ListBucket\"],\"Resource\":[\"arn:aws:s3:::$FIGAN_BUCKET\"],\"Condition\":{\"StringLike\":{\"s3:prefix\":[\"$1\",\"$1/*\"]}}}" \
        "{\"Effect\":\"Allow\",\"Action\":[\"s3:GetObject\",\"s3:PutObject\",\"s3:DeleteObject\",\"s3:AbortMultipartUpload\",\"s3:ListMultipartUploadParts\"],\"Resource\":[\"arn:aws:s3:::$FIGAN_BUCKET/$1/*\"]}"
}

# provision USER SECRET POLICY PREFIX
provision() {
    policy_json "$4" > "$work/$3.json"
    mcx admin policy create figan "$3" "$work/$3.json"
    mcx admin user add figan "$1" "$2"
    mcx admin policy attach figan "$3" --user "$1" >/dev/null 2>&1 || true      # fails when already attached
    case "$(mcx admin user info figan "$1" --json)" in
        *"\"$3\""* | *"$3,"* | *",$3"*) echo "minio-provision: $1 → $3 (s3://$FIGAN_BUCKET/$4/)" ;;
        *) echo "minio-provision: policy $3 is not attached to user $1" >&2; exit 1 ;;
    esac
}

tries=0
until mcx alias set figan "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { echo "minio-provision: MinIO at $MINIO_URL did not answer" >&2; exit 1; }
    sleep 2
done
mcx mb --ignore-existing "figan/$FIGAN_BUCKET"
mcx version enable "figan/$FIGAN_BUCKET"
provision "$MLFLOW_S3_ACCESS_KEY" "$MLFLOW_S3_SECRET_KEY" figan-mlflow-artifacts mlflow
provision "$WORKER_S3_ACCESS_KEY" "$WORKER_S3_SECRET_KEY" figan-dvc-remote dvc
