# MLflow's server image plus the PostgreSQL driver and the S3 client its stores need, and the basic-auth
# app's own requirements (mlflow[auth]: Flask-WTF, for its CSRF checks) at the image's MLflow version.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.10" "boto3==1.44.8"
