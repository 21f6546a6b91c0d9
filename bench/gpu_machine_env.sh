# GPU-machine scaffolding, not a benchmark: sourced at the start of every device call on a rented GPU machine
# (bench/gpu_machine_session.sh does it). Installs the packages carried in .devcarry/ once per machine, assembles
# onnxruntime-gpu from its carried parts once all are there, and sets the environment for bench/*.py.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ ! -f /tmp/site/.ok ] && [ -f .devcarry/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .devcarry/site.tar.xz -C /tmp/site && touch /tmp/site/.ok
fi
if [ ! -f /tmp/site/.whl-ok ] && ls .whl/*.whl >/dev/null 2>&1; then  # the serving stack: fastapi, starlette, uvicorn,
  # h11, click, anyio, sniffio, opentelemetry-api (fastapi imports it), carried in an ignored .whl/ (docs/notes.md)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.whl-ok
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/ortparts
for p in .devcarry/ort.part*; do [ -f "$p" ] && cp "$p" /tmp/ortparts/; done
if [ ! -f /tmp/ort/.ok ] && [ "$(ls /tmp/ortparts | wc -l)" -ge 4 ]; then  # onnxruntime-gpu, xz, split -n 4
  mkdir -p /tmp/ort && cat /tmp/ortparts/ort.part* | xz -d | tar -x -C /tmp/ort && touch /tmp/ort/.ok
fi
if [ -f /tmp/ort/.ok ]; then
  export PYTHONPATH=/tmp/ort:$PYTHONPATH
  NV=$(python3 -c "import nvidia,glob,os; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d+'/**/lib*.so*', recursive=True)})))" 2>/dev/null)
  export LD_LIBRARY_PATH=$NV:${LD_LIBRARY_PATH:-}
fi
echo "gpu_machine_env: site=$([ -f /tmp/site/.ok ] && echo yes) ort_parts=$(ls /tmp/ortparts | wc -l) ort=$([ -f /tmp/ort/.ok ] && echo yes)"
