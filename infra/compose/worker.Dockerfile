# The Prefect worker image: the project, installed from infra/constraints.txt (CPU; build from the repo root).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /project
COPY pyproject.toml README.md ./
COPY infra/constraints.txt infra/constraints.txt
RUN pip install --no-cache-dir -c infra/constraints.txt torch torchvision
COPY . .
RUN pip install --no-cache-dir -c infra/constraints.txt -e ".[cpu]"
