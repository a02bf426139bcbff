# One image for the API and the worker. CPU torch; for GPU workers build on a CUDA base image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml requirements-nodeps.txt README.md ./
COPY cvpo ./cvpo
COPY api ./api
COPY core ./core
COPY worker ./worker
COPY service ./service
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
 && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt
ENV CVPO_DATA_DIR=/data
VOLUME /data
