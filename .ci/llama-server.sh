#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp tree that the llama-cpp-python
# sdist on PyPI vendors (model hubs and GitHub are out of reach here; PyPI is not).
# The build takes about 11 minutes on 2 cores, so it is cached outside the clone,
# keyed by the sdist version: once per machine. Prints the cache folder on stdout:
#   <cache>/bin/llama-server
#   <cache>/convert/convert_hf_to_gguf.py  (with conversion/ and gguf-py/ beside it)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${VLMTAG_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmtag-ci}"
CACHE="$ROOT/llama-server-$VERSION-$(uname -m)"
PYTHON="${PYTHON:-python3}"

if [ -x "$CACHE/bin/llama-server" ] && "$CACHE/bin/llama-server" --version >/dev/null 2>&1; then
  echo "$CACHE"
  exit 0
fi

mkdir -p "$ROOT"
work="$(mktemp -d "$ROOT/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "llama-server: fetching the llama-cpp-python $VERSION sdist" >&2
"$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
  "llama-cpp-python==$VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"

echo "llama-server: building (about 11 minutes on 2 cores)" >&2
# The UI off: with it on, CMake tries to download web assets. Static, so the
# cached binary needs no shared libraries beside it.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake.log" 2>&1 \
  || { tail -30 "$work/cmake.log" >&2; exit 1; }
cmake --build "$work/build" --target llama-server -j"$(nproc)" >"$work/build.log" 2>&1 \
  || { tail -30 "$work/build.log" >&2; exit 1; }

staged="$work/staged"
mkdir -p "$staged/bin" "$staged/convert"
cp "$work/build/bin/llama-server" "$staged/bin/"
cp "$src/convert_hf_to_gguf.py" "$staged/convert/"
[ -d "$src/conversion" ] && cp -r "$src/conversion" "$staged/convert/"
cp -r "$src/gguf-py" "$staged/convert/"
"$staged/bin/llama-server" --version >/dev/null 2>&1

# Into place in one rename, so an interrupted build never looks finished.
rm -rf "$CACHE"
mv "$staged" "$CACHE"
echo "$CACHE"
