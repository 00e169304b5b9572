# crgate service image. Build: docker build -t crgate .   Run: docker run --rm crgate --help
FROM python:3.11-slim-bookworm

# OpenJPEG for glymur (no PyPI wheel provides libopenjp2); nothing else is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 crgate
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY models ./models
RUN pip install --no-cache-dir . && mkdir -p /data && chown crgate /data

USER crgate
ENV CRGATE_DATA_DIR=/data
VOLUME ["/data"]
ENTRYPOINT ["crgate"]
CMD ["--help"]
