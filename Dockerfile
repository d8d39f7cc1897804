# Minimal image; the deployment issue hardens it (multi-stage, probes, manifests).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY authz_server ./authz_server
RUN pip install . && useradd --uid 10001 --no-create-home authz
USER 10001
EXPOSE 9001 9090
ENTRYPOINT ["python", "-m", "authz_server", "serve", "--config", "/etc/authz-server/"]
