#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-perplexity natively (GGML_NATIVE=ON: this CPU's own
# instructions, as a user who builds llama.cpp gets) from the source vendored in the llama-cpp-python sdist, once per
# machine, into a cache folder. Prints the folder holding the binaries; benchmarks and tests reuse it.
#
#   benchmarks/llamacpp.sh            # build if missing (about 10 minutes on 2 cores), print the bin folder
#   LLAMACPP_VERSION=0.3.36 benchmarks/llamacpp.sh
#
# The sdist comes from PyPI (pip download), the only network access; the build itself is offline.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pip="${PIP:-$here/.venv/bin/pip}"  # PIP may be a command with arguments: "python -m pip"
[ -n "${PIP:-}" ] || [ -x "$pip" ] || pip="python3 -m pip"
version="${LLAMACPP_VERSION:-$($pip show llama-cpp-python 2>/dev/null | sed -n 's/^Version: //p' || true)}"
version="${version:-0.3.36}"
# The CPU's flags are part of the key: a cache copied to another machine is not reused there.
cpu=$( (grep -m1 '^flags' /proc/cpuinfo || uname -m) | sha256sum | cut -c1-12)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/fourwalls/llama.cpp-$version-$cpu"
bin="$cache/bin"
if [ -x "$bin/llama-server" ] && [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-perplexity" ]; then
    echo "$bin"
    exit 0
fi
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then  # Debian's, as the other scripts install theirs
    [ "$(id -u)" -eq 0 ] || { echo "llamacpp.sh: cmake and a C++ compiler are needed (apt-get install cmake g++)" >&2; exit 2; }
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >&2
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/llamacpp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
$pip download -q --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$version" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" -j "$(nproc)" --target llama-server llama-bench llama-perplexity >&2
mkdir -p "$cache.tmp/bin"
cp "$work"/build/bin/llama-server "$work"/build/bin/llama-bench "$work"/build/bin/llama-perplexity "$cache.tmp/bin/"
rm -rf "$cache"
mv "$cache.tmp" "$cache"
echo "$bin"
