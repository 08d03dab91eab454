-- The Prefect server's database; MLflow's (POSTGRES_DB=mlflow) is created by the image itself.
CREATE DATABASE prefect OWNER dinov2;
