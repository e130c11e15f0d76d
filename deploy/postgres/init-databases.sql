-- Runs once, on an empty data volume (docker-entrypoint-initdb.d), as POSTGRES_USER.
-- POSTGRES_DB creates `mlflow`; Prefect's server gets its own database in the same instance.
CREATE DATABASE prefect;
