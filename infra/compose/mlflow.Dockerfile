# MLflow tracking server with S3 (boto3) and PostgreSQL (psycopg2) support, pinned like infra/constraints.txt.
FROM python:3.11-slim
RUN pip install --no-cache-dir mlflow==3.17.2 boto3==1.43.117 psycopg2-binary==2.9.13
USER nobody
