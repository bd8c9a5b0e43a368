#!/usr/bin/env bash
# Installs llama-cpp-python built with llama.cpp's RPC backend (GGML_RPC=on), on CPU
# machines too, from a wheel cached under ~/.cache/aivailable/wheels-rpc/<key>/.
#
# Why not plain `pip install`: pip's own wheel cache is keyed by the sdist alone and
# ignores CMAKE_ARGS, so a wheel built without RPC would be reused forever. The key
# here is version + flags: a fresh machine builds once (minutes), later set-ups install
# the cached wheel in seconds, and a change of flags builds a new wheel beside it.
#
# CUDA is added when this machine has an NVIDIA GPU and nvcc; LLAMA_CMAKE_ARGS replaces
# the flags entirely.
set -euo pipefail
PY=${PY:-.venv/bin/python}
VERSION=${LLAMA_CPP_VERSION:?LLAMA_CPP_VERSION must name the llama-cpp-python version}
flags="-DGGML_RPC=on"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && command -v nvcc >/dev/null; then
  flags="$flags -DGGML_CUDA=on"
fi
flags=${LLAMA_CMAKE_ARGS:-$flags}
key="$VERSION-$(printf '%s' "$flags" | sha256sum | cut -c1-12)"
cache=${AIVAILABLE_CACHE_DIR:-$HOME/.cache/aivailable}/wheels-rpc/$key

# Already installed, this version, with RPC: nothing to do.
if $PY - "$VERSION" <<'PYEOF' 2>/dev/null; then
import importlib.metadata as m, sys
import llama_cpp
sys.exit(0 if m.version("llama-cpp-python") == sys.argv[1] and llama_cpp.llama_supports_rpc() else 1)
PYEOF
  echo "llama-cpp-python $VERSION with RPC is installed"
  exit 0
fi

wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION with $flags (once; about 5 minutes on 2 cores)"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # --no-cache-dir: pip must not hand back a wheel it built earlier with other flags.
  CMAKE_ARGS="$flags" $PY -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -w "$tmp"
  mv "$tmp"/llama_cpp_python-*.whl "$cache/"
  echo "$flags" >"$cache/flags"
  wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl | head -1)
fi
echo "installing $wheel"
$PY -m pip install --quiet --force-reinstall --no-deps "$wheel"
$PY -m pip install --quiet "$wheel"  # its dependencies (numpy, jinja2, ...)
$PY -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else "llama.cpp without RPC")'
