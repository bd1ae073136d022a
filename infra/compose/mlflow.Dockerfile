# MLflow's server image plus the PostgreSQL driver and the S3 client its stores need.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary==2.9.10" "boto3==1.44.8"
