# pgmigrate-proxy image.
#   docker build -t pgmigrate-proxy .
#   docker run -p 6432:6432 -e PGMIGRATE_PROXY_UPSTREAM=postgresql://pgmigrate@db.example.com/app \
#       -e PGPASSWORD=... pgmigrate-proxy
# The URL's user is the guard's admin role (a superuser, or one granted pg_read_all_stats and
# pg_signal_backend); without one libpq would log in as the image's user, and the proxy exits 2.
# Settings: PGMIGRATE_PROXY_* variables, flags after the image name, or a TOML file mounted
# and named with --config. SIGTERM shuts down gracefully within shutdown_grace (30 s by
# default): give `docker stop -t` (10 s by default) more than that, or lower the grace.
# The image has no embedded PostgreSQL: set an upstream.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a C compiler: setup.py compiles the relay's hot path with mypyc (the image gets the .so files
# only; without one the build would fall back to the slower pure-Python modules)
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README* ./
COPY proxy ./proxy
COPY django_integration ./django_integration
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system pgmigrate-proxy \
 && useradd --system --gid pgmigrate-proxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin pgmigrate-proxy
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

ENV PGMIGRATE_PROXY_LISTEN_HOST=0.0.0.0
EXPOSE 6432
USER pgmigrate-proxy
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import os, socket; socket.create_connection(('127.0.0.1', int(os.environ.get('PGMIGRATE_PROXY_LISTEN_PORT', '6432'))), 3).close()"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgmigrate-proxy"]
