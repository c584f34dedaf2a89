# rollguard gateway image (CPU). Build: docker build -t rollguard .
# Run:   docker run -e ROLLGUARD_ADMIN_TOKEN=<16+ chars> -p 8080:8080 -p 8081:8081 -p 8082:8082 \
#          -v "$PWD/registry:/models:ro" -v "$PWD/policies:/etc/rollguard/policies:ro" \
#          -v rollguard-state:/var/lib/rollguard rollguard
# tests/test_container.py starts this layout (from `git archive`) as uid 10001 against a
# read-only /app; hadolint checks this file (tests/test_container.py, scripts/test.sh).

# ---- build: a virtualenv with the dependencies, then rollguard itself --------------------
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
RUN python -m venv /opt/rollguard
# The core proxies `framework: http` upstreams and installs no model runtime. To load model
# files in the gateway: --build-arg EXTRAS=onnx,sklearn (or all; torch also wants
# PIP_EXTRA_INDEX_URL pointing at PyTorch's CPU wheels, or it pulls a CUDA build).
# Fleet mode (`state: redis://`, several gateways sharing one rollout): EXTRAS=fleet.
# Drift checks (`metric: drift`, scipy's KS test): EXTRAS=drift.
ARG EXTRAS=""
# Dependencies first, from pyproject.toml alone: a source change does not reinstall them.
COPY pyproject.toml scripts/requirements.py ./
RUN python requirements.py pyproject.toml "$EXTRAS" > requirements.txt \
    && /opt/rollguard/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
COPY README.md ./
COPY rollguard ./rollguard
COPY proxy ./proxy
COPY serving ./serving
COPY policy ./policy
RUN /opt/rollguard/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps .

# ---- runtime: the virtualenv, the settings file, no compiler, no demo policy -----------
FROM python:3.11.14-slim-bookworm
COPY --from=build /opt/rollguard /opt/rollguard
# Only the settings file: config/policies (the demo `fraud` rollout) stays out, so nothing
# rolls out until you mount your own policies.
COPY config/rollguard.yaml /app/config/rollguard.yaml
# Writable defaults owned by the runtime uid; /app and the virtualenv stay root-owned.
RUN mkdir -p /var/lib/rollguard /models /etc/rollguard/policies \
    && chown 10001:10001 /var/lib/rollguard
WORKDIR /var/lib/rollguard
# The admin port (8081: /admin, /metrics) listens beyond loopback so Prometheus can scrape
# /metrics; /admin needs ROLLGUARD_ADMIN_TOKEN (the gateway refuses to start without one).
ENV PATH=/opt/rollguard/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ROLLGUARD_HOST=0.0.0.0 \
    ROLLGUARD_PORT=8080 \
    ROLLGUARD_ADMIN_HOST=0.0.0.0 \
    ROLLGUARD_ADMIN_PORT=8081 \
    ROLLGUARD_GRPC_PORT=8082 \
    ROLLGUARD_REGISTRY=/models \
    ROLLGUARD_POLICIES=/etc/rollguard/policies \
    ROLLGUARD_STATE=/var/lib/rollguard
VOLUME ["/var/lib/rollguard", "/models"]
USER 10001:10001
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['ROLLGUARD_PORT'] + '/v2/health/live', timeout=2)"]
ENTRYPOINT ["rollguard"]
CMD ["serve", "--config", "/app/config/rollguard.yaml"]
