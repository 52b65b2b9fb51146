-- One database per server, both owned by the POSTGRES_USER role (run once, on an empty volume).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
