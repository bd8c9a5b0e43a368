#!/usr/bin/env bash
# Builds llama.cpp's own llama-server, the anchor of bench/serve.py, from the llama.cpp
# sources vendored in the sdist of the llama-cpp-python version we install, so both
# sides run the same kernels. Result: ~/.cache/aivailable/anchor/bin/llama-server.
set -euo pipefail
PY=${PY:-.venv/bin/python}
version=$($PY -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
cache=${AIVAILABLE_CACHE_DIR:-$HOME/.cache/aivailable}/anchor
bin=$cache/bin/llama-server
if [ -x "$bin" ] && [ "$(cat "$cache/version" 2>/dev/null)" = "$version" ]; then
  echo "llama-server for llama-cpp-python $version: $bin"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching the llama-cpp-python $version sdist"
$PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
echo "building llama-server (a few minutes on 2 cores)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON >/dev/null
cmake --build "$work/build" --target llama-server -j "$(nproc)" >/dev/null
mkdir -p "$cache/bin"
cp "$work/build/bin/llama-server" "$bin"
# the shared libraries it links, beside it
find "$work/build" -name '*.so*' -exec cp -P {} "$cache/bin/" \;
echo "$version" >"$cache/version"
echo "built $bin"
