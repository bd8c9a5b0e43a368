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
else  # unpacked into the cache, beside the kept build tree that refers to it
  src=$cache/src/llama_cpp_python-$version/vendor/llama.cpp
  if [ ! -d "$src" ]; then
    echo "fetching the llama-cpp-python $version sdist"
    $PY -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
    mkdir -p "$cache/src"
    tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$cache/src"
  fi
fi
build=$cache/build  # kept: a repeated build (new flags, a failed step) resumes
if [ -f "$build/CMakeCache.txt" ] && ! grep -q "CMAKE_HOME_DIRECTORY:INTERNAL=$src\$" "$build/CMakeCache.txt"; then
  rm -rf "$build"  # built from other sources
fi
echo "building llama-server and rpc-server (a few minutes on 2 cores)"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_RPC=ON \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=ON >/dev/null
cmake --build "$build" --target llama-server ggml-rpc-server -j "$(nproc)" >/dev/null
mkdir -p "$cache/bin"
cp "$build/bin/llama-server" "$bin"
cp "$build/bin/ggml-rpc-server" "$cache/bin/rpc-server"
# the shared libraries it links, beside it
find "$build" -name '*.so*' -exec cp -P {} "$cache/bin/" \;
echo "$stamp" >"$cache/version"
echo "built $bin"
