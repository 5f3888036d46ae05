# switchd's image: the package on a slim Python, run as a non-root user.
# Give that user the Docker socket's group at run time (compose: group_add).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY switchd ./switchd
COPY static ./static
ENV SWITCHD_STATIC_DIR=/src/static
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /var/lib/switchd switchd \
    && mkdir -p /var/lib/switchd /etc/switchd \
    && chown switchd /var/lib/switchd

USER switchd
WORKDIR /var/lib/switchd
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
ENTRYPOINT ["switchd"]
CMD ["serve", "--config", "/etc/switchd/switchd.yaml"]
