"""The one-shot bucket creation of the smoke stack (deploy/compose.smoke.yaml's minio-init, in the S3 stand-in's
image): the bucket, versioned, as k8s/scripts/minio-provision.sh makes it on MinIO. Its per-client users and
prefix policies are MinIO's own admin API; moto accepts any access key, so here MLflow and the worker reach the
whole bucket with the keys deploy/.env gives them. Idempotent; waits up to a minute for the server."""
import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

url = os.environ.get("MINIO_URL", "http://minio:9000")
bucket = os.environ["FIGAN_BUCKET"]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id=os.environ["MINIO_ROOT_USER"],
                  aws_secret_access_key=os.environ["MINIO_ROOT_PASSWORD"],
                  config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

deadline = time.monotonic() + 60
while True:
    try:
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        break
    except (BotoCoreError, ClientError) as e:
        if time.monotonic() > deadline:
            sys.exit(f"s3-bucket: the S3 server at {url} did not answer within 60 s: {e}")
        time.sleep(2)
if bucket not in existing:
    s3.create_bucket(Bucket=bucket)
s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
print(f"s3-bucket: s3://{bucket} ready (versioned) at {url}")
