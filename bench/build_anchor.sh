#!/usr/bin/env bash
# Builds llama.cpp's own llama-server (the anchor of bench/serve.py) and rpc-server (with
# llama-server --rpc, the anchor of bench/split.py), with GGML_RPC=ON, from the llama.cpp
# sources vendored in the sdist of the llama-cpp-python version we install, so both
# sides run the same kernels. Result: ~/.cache/aivailable/anchor/bin/{llama,rpc}-server.
# LLAMA_SRC: an unpacked vendor/llama.cpp to build from instead of fetching the sdist.
set -euo pipefail
PY=${PY:-.venv/bin/python}
version=$($PY -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
cache=${AIVAILABLE_CACHE_DIR:-$HOME/.cache/aivailable}/anchor
bin=$cache/bin/llama-server
stamp="$version rpc"
if [ -x "$bin" ] && [ -x "$cache/bin/rpc-server" ] && [ "$(cat "$cache/version" 2>/dev/null)" = "$stamp" ]; then
  echo "llama-server and rpc-server for llama-cpp-python $version: $cache/bin"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${LLAMA_SRC:-}" ]; then
  src=$LLAMA_SRC
else
  echo "fetching the llama-cpp-python $version sdist"
  $PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
  tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
fi
echo "building llama-server and rpc-server (a few minutes on 2 cores)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_RPC=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON >/dev/null
cmake --build "$work/build" --target llama-server rpc-server -j "$(nproc)" >/dev/null
mkdir -p "$cache/bin"
cp "$work/build/bin/llama-server" "$bin"
cp "$work/build/bin/rpc-server" "$cache/bin/rpc-server"
# the shared libraries it links, beside it
find "$work/build" -name '*.so*' -exec cp -P {} "$cache/bin/" \;
echo "$stamp" >"$cache/version"
echo "built $bin"
