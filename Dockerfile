# tidegate: MySQL sidecar proxy + online schema-change migrator.
# Small, non-root image; the entrypoint is `tidegate serve`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrator ./migrator
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 tidegate \
 && useradd --system --uid 10001 --gid tidegate --no-create-home --shell /usr/sbin/nologin tidegate
COPY --from=build /install /usr/local
USER 10001:10001
# 6033 MySQL for apps, 6032 admin SQL, 9104 metrics and health
EXPOSE 6033 6032 9104
ENV TIDEGATE_LISTEN=0.0.0.0:6033 \
    TIDEGATE_HTTP_LISTEN=0.0.0.0:9104 \
    PYTHONUNBUFFERED=1
HEALTHCHECK --interval=10s --timeout=2s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9104/healthz', timeout=1).status == 200 else 1)"]
ENTRYPOINT ["tidegate", "serve"]
