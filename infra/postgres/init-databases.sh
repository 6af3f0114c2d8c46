#!/bin/sh
# First start of the postgres container only (docker-entrypoint-initdb.d): one database per
# service, owned by POSTGRES_USER. MLflow and Prefect create their own tables on first start.
set -eu
for db in "$MLFLOW_DB" "$PREFECT_DB"; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
