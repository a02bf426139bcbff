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
# Not root (issue #23 item 8): a flaw in the API or a training job does not own the container. /data
# is created here owned by that user (0700), so a named volume mounted on it starts out the same.
RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home cvpo \
 && mkdir -p /data && chown cvpo:cvpo /data && chmod 0700 /data
ENV CVPO_DATA_DIR=/data
VOLUME /data
USER 10001:10001
