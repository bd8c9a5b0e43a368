#!/usr/bin/env bash
# `make vulkan`: llama-cpp-python built with llama.cpp's Vulkan backend (and RPC, to match
# the CPU build) into its own venv, .venv-vulkan, from a wheel cached under
# ~/.cache/aivailable/wheels-vulkan/<key>/. Never touches .venv: a Vulkan libllama there
# would change every CPU test.
#
# Needs Debian's libvulkan-dev, glslc and spirv-headers to build, and a Vulkan driver to
# run (mesa-vulkan-drivers gives lavapipe, a software GPU: what CI tests on).
# The key is version + flags, as for the CPU wheel: pip's own cache ignores CMAKE_ARGS.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VULKAN_VENV:-.venv-vulkan}
VERSION=${LLAMA_CPP_VERSION:?LLAMA_CPP_VERSION must name the llama-cpp-python version}
flags=${LLAMA_VULKAN_CMAKE_ARGS:--DGGML_VULKAN=on -DGGML_RPC=on}
root=${AIVAILABLE_CACHE_DIR:-$HOME/.cache/aivailable}

# The vendored llama.cpp (0.3.36) uses VK_EXT_layer_settings (vk::LayerSettingEXT), which
# Debian 12's Vulkan headers (1.3.239) predate. Then take Debian 13's headers (1.4.309):
# only extracted into the cache, with apt state of their own, so the system stays as it is.
# FindVulkan still finds the system's libvulkan.so (the loader's ABI is stable).
sys_header=/usr/include/vulkan/vulkan_core.h
if [ -z "${LLAMA_VULKAN_CMAKE_ARGS:-}" ] && ! grep -q VK_EXT_layer_settings "$sys_header" 2>/dev/null; then
  headers=$root/vulkan-headers/trixie
  if [ ! -e "$headers/usr/include/vulkan/vulkan_core.h" ]; then
    echo "the system's Vulkan headers lack VK_EXT_layer_settings: fetching Debian trixie's"
    apt=$root/vulkan-headers/apt
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$headers"
    echo "deb http://deb.debian.org/debian trixie main" >"$apt/sources.list"
    opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq
    (cd "$apt" && apt-get "${opts[@]}" download libvulkan-dev spirv-headers)
    for deb in "$apt"/*.deb; do dpkg -x "$deb" "$headers"; done
  fi
  flags="$flags -DVulkan_INCLUDE_DIR=$headers/usr/include"
  flags="$flags -DSPIRV-Headers_DIR=$headers/usr/share/cmake/SPIRV-Headers"
fi
key="$VERSION-$(printf '%s' "$flags" | sha256sum | cut -c1-12)"
cache=$root/wheels-vulkan/$key
# A local sdist (LLAMA_SDIST) spares the download; otherwise pip fetches the version.
src=${LLAMA_SDIST:-llama-cpp-python==$VERSION}

wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $VERSION with $flags (once; shader compilation is slow)"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  start=$(date +%s)
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    nice -n 10 "$PYTHON" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \
    "$src" -w "$tmp"
  mv "$tmp"/llama_cpp_python-*.whl "$cache/"
  echo "$flags" >"$cache/flags"
  echo "$(($(date +%s) - start))" >"$cache/build-seconds"
  echo "built in $(cat "$cache/build-seconds") s"
  wheel=$(ls "$cache"/llama_cpp_python-"$VERSION"-*.whl | head -1)
fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
# Keyed by the wheel and pyproject.toml: new app dependencies reinstall as in .venv.
stamp="$VENV/.vulkan-$key-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -e "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet --force-reinstall "$wheel"
  # The app's runtime dependencies; llama-cpp-python is already satisfied by the wheel.
  "$VENV/bin/python" -m pip install --quiet -e .
  rm -f "$VENV"/.vulkan-*
  touch "$stamp"
fi
"$VENV/bin/python" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else "llama.cpp without GPU offload")'
echo "Vulkan build ready in $VENV"
