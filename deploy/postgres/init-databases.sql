-- Runs once, on an empty data volume (docker-entrypoint-initdb.d), as the superuser, through psql.
-- One login role per client, each owning only its own database; nobody else may connect to either:
--   mlflow  (password MLFLOW_DB_PASSWORD)  → database mlflow   (MLflow backend store)
--   prefect (password PREFECT_DB_PASSWORD) → database prefect  (Prefect server)
-- The passwords come from the container's environment (psql's \getenv); the superuser stays with the operator.
-- Kept identical to the ConfigMap postgres-init in deploy/k8s/postgres.yaml (tests/test_deploy_files.py).
\set ON_ERROR_STOP on
\getenv mlflow_password MLFLOW_DB_PASSWORD
\getenv prefect_password PREFECT_DB_PASSWORD
\if :{?mlflow_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'init-databases.sql: MLFLOW_DB_PASSWORD is not set in the postgres container'; END $$;
\endif
\if :{?prefect_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'init-databases.sql: PREFECT_DB_PASSWORD is not set in the postgres container'; END $$;
\endif

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE prefect FROM PUBLIC;
-- Prefect's migrations ask for pg_trgm (trusted, but created here so the prefect role needs no extra right)
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
