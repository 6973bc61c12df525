# The pipeline's image: worker, beat, Flower and the migration step all run it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 1000 sentiment
WORKDIR /app
COPY pyproject.toml setup.cfg README.md alembic.ini celeryconfig.py ./
COPY sentiment ./sentiment
COPY alembic ./alembic
RUN pip install . && mkdir -p /data && chown sentiment /data
USER sentiment
CMD ["celery", "-A", "sentiment", "worker", "--loglevel", "INFO"]
