"""The local stack behind `loraflow up` / `down` / `status`: its settings, the services (Prefect
server, MLflow server, workers of the gpu and cpu pools) and the postgres backend's server."""
