# crgate service image: one image, each compose service picks its command (api, scp, worker,
# migrate). Build: docker build -t crgate .   GPU workers: docker build --build-arg EXTRAS=gpu

# OHIF Viewer v3: the prebuilt dist/ of @ohif/app from the npm registry (as `make viewer`), served
# by the api under /viewer/ (CRGATE_VIEWER_DIR). Keep the version equal to the Makefile's.
FROM node:20-bookworm-slim AS ohif
ARG OHIF_VERSION=3.13.2
WORKDIR /ohif
RUN npm pack --silent "@ohif/app@${OHIF_VERSION}" \
    && tar xzf "ohif-app-${OHIF_VERSION}.tgz" && mv package/dist dist && rm -rf package ./*.tgz

FROM python:3.11-slim-bookworm

# OpenJPEG for glymur (no PyPI wheel provides libopenjp2); nothing else is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/*

ARG EXTRAS=""
RUN useradd --create-home --uid 10001 crgate
WORKDIR /app
COPY pyproject.toml README.md ./
COPY services ./services
COPY models ./models
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: with the gpu extra the
# CPU wheel is removed and the GPU one reinstalled over it, so the CUDA provider is really there.
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && case ",$EXTRAS," in *,gpu,*) \
         pip uninstall -y onnxruntime \
         && pip install --no-cache-dir --force-reinstall --no-deps "onnxruntime-gpu>=1.17" \
         && python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()" ;; \
       esac \
    && mkdir -p /data && chown crgate /data
# the viewer moved under /viewer/ with crgate's configuration (services/api/viewer.py)
COPY --from=ohif /ohif/dist /app/viewer
RUN python -m services.api.viewer /app/viewer >/dev/null

USER crgate
ENV CRGATE_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8080 11112
# The API's liveness; compose overrides it for the scp and worker services.
HEALTHCHECK --interval=10s --timeout=5s --retries=5 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)" || exit 1
ENTRYPOINT ["crgate"]
CMD ["serve"]
