# rollguard gateway image (CPU). Build: docker build -t rollguard .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY serving ./serving
COPY policy ./policy
COPY rollguard ./rollguard
COPY config ./config
# torch is optional; add '[torch]' to serve PyTorch models (pinned CPU wheel).
RUN pip install --no-cache-dir '.' && useradd --uid 10001 rollguard
USER rollguard
# The admin port (8081: /admin, /metrics) listens beyond loopback so that Prometheus can
# scrape /metrics; /admin needs a token: docker run -e ROLLGUARD_ADMIN_TOKEN=<16+ chars>
# (the gateway refuses to start without one).
ENV ROLLGUARD_HOST=0.0.0.0 ROLLGUARD_PORT=8080 ROLLGUARD_ADMIN_HOST=0.0.0.0 ROLLGUARD_ADMIN_PORT=8081
EXPOSE 8080 8081
ENTRYPOINT ["rollguard"]
CMD ["serve", "--config", "/app/config/rollguard.yaml"]
