FROM python:3.11.14-slim-bookworm

WORKDIR /app
COPY requirements.txt .
# the service's pins only (the tests' are in requirements-dev.txt)
RUN pip install --no-cache-dir -r requirements.txt
COPY chat_stream.py .

RUN useradd --system --uid 10001 --no-create-home chat
USER 10001
# Only localhost and IP addresses are served in Host by default (DNS rebinding): behind a load balancer or as a sidecar,
# run with -e ALLOWED_HOSTS=<the names clients use>, and set CHAT_API_KEY.
ENV HOST=0.0.0.0 PORT=8000 PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/healthz', timeout=2)"]
CMD ["python", "chat_stream.py"]
