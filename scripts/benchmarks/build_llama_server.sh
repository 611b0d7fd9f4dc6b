#!/usr/bin/env bash
# Build llama.cpp's own C++ server, `llama-server`, from the llama.cpp sources that the installed
# llama-cpp-python's sdist vendors, so the comparison runs the same llama.cpp as our engine.
# Output: .bench/llama-server (never committed). Takes a few minutes on two cores.
#
#   scripts/benchmarks/build_llama_server.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')
work=.bench/llama-cpp-python-$version
mkdir -p .bench
if [ ! -d "$work" ]; then
  echo "build: fetching the llama-cpp-python $version sdist"
  .venv/bin/python -m pip download --quiet --no-binary :all: --no-deps \
    "llama-cpp-python==$version" -d .bench
  tar -C .bench -xzf ".bench/llama_cpp_python-$version.tar.gz"
  mv ".bench/llama_cpp_python-$version" "$work"
fi
echo "build: configuring vendor/llama.cpp (CPU, release)"
cmake -S "$work/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >/dev/null
echo "build: compiling llama-server with $(nproc) jobs"
cmake --build "$work/build" --target llama-server -j "$(nproc)" 2>&1 | grep -E '^\[ *[0-9]+%' | awk 'NR % 20 == 0'
cp "$work/build/bin/llama-server" .bench/llama-server
echo "build: done: .bench/llama-server ($(.bench/llama-server --version 2>&1 | head -1))"
