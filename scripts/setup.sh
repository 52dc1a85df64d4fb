#!/usr/bin/env bash
# Install what coldstart needs on a Debian 12 machine (as root), idempotently:
# the apt packages, then a venv at .venv with the project and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
  runc skopeo umoci containerd docker-registry debootstrap busybox-static
  iproute2 kmod strace zstd ca-certificates procps psmisc util-linux patch
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# containerd and docker-registry are started by the tests and benchmarks themselves, on private
# sockets and loopback ports. Debian starts their own services on install: those this run
# installed are switched off again; one that was installed before (a host's Docker runs on its
# containerd) is left as it is.
for svc in containerd docker-registry; do
  if [[ " ${missing[*]} " == *" $svc "* ]]; then
    systemctl disable --now "$svc" >/dev/null 2>&1 || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pyfuse3 with coldstart's patch (third_party/pyfuse3/README.md): built from the PyPI sdist.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH=third_party/pyfuse3/pyfuse3-$PYFUSE3_VERSION-coldstart3.patch
if ! .venv/bin/python -c "import pyfuse3, sys; sys.exit('read_parts' not in getattr(pyfuse3, 'coldstart_features', ()))" 2>/dev/null; then
  echo "setup: building pyfuse3 $PYFUSE3_VERSION with $PYFUSE3_PATCH"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  .venv/bin/pip download -q --no-deps --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$build" 2>/dev/null
  echo "$PYFUSE3_SHA256  $build/pyfuse3-$PYFUSE3_VERSION.tar.gz" | sha256sum -c --quiet
  tar xzf "$build/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$build"
  src="$build/pyfuse3-$PYFUSE3_VERSION"
  patch -s -p1 -d "$src" < "$PYFUSE3_PATCH"
  rm -f "$src/src/pyfuse3/__init__.c"  # generated again by Cython from the patched sources
  .venv/bin/pip install -q "$src"
  rm -rf "$build"
  trap - EXIT
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true
echo "setup: ok ($(.venv/bin/python --version), $(runc --version | head -1))"
