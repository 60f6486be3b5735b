#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine (as root), idempotently:
# the Debian packages (FUSE 3, its headers for building pyfuse3, the test oracles and clients)
# and a Python virtual environment in .venv with the project installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr
              fuse-overlayfs busybox-static uidmap podman util-linux kmod strace)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# pyfuse3, patched so readdir can be stateless and the kernel caches listings (see
# third_party/README.md); built from the verified upstream sdist before anything pulls upstream's.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_PATCH=third_party/pyfuse3-$PYFUSE3_VERSION-unionfs.patch
PYFUSE3_LOCAL=$PYFUSE3_VERSION+unionfs.$(sha256sum "$PYFUSE3_PATCH" | cut -c1-8)
have=$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' \
       2>/dev/null || true)
if [ "$have" != "$PYFUSE3_LOCAL" ]; then
  echo "setup: building pyfuse3 $PYFUSE3_LOCAL (upstream $PYFUSE3_VERSION + $PYFUSE3_PATCH)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/pip download -q --no-deps --no-binary :all: -d "$tmp" "pyfuse3==$PYFUSE3_VERSION"
  echo "$PYFUSE3_SHA256  $tmp/pyfuse3-$PYFUSE3_VERSION.tar.gz" | sha256sum -c --quiet
  tar xzf "$tmp/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$tmp"
  patch -s -p1 -d "$tmp" < "$PYFUSE3_PATCH"
  SETUPTOOLS_SCM_PRETEND_VERSION=$PYFUSE3_LOCAL \
    .venv/bin/pip install -q --no-deps --force-reinstall "$tmp/pyfuse3-$PYFUSE3_VERSION"
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python dependencies into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # The checkout on sys.path by a plain .pth line ('compat' mode): the default editable mode
  # installs an import hook whose own imports cost about 15 ms of every Python start, and every
  # mount starts one. Setuptools calls the mode transitional; without it, the default mode.
  .venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat 2>/dev/null ||
    .venv/bin/pip install -q -e '.[test]'
  rm -f .venv/.installed-*; touch "$stamp"
fi
# setuptools (which venv installs with pip) puts a line in site-packages that imports its
# distutils shim into every Python started here, each mount's server and each mountctl
# command included (0.6-1 ms of each); nothing here runs distutils. Removed every time: an
# upgrade of setuptools puts it back.
rm -f .venv/lib/python3*/site-packages/distutils-precedence.pth
# Bytecode for our own modules: every mount starts a Python process, and where the environment
# says not to write bytecode (PYTHONDONTWRITEBYTECODE) each start would compile them again
# (about 45 ms of every mount). Checked-hash files are validated against the source's hash on
# import, so an edited module is never run from stale bytecode.
.venv/bin/python -m compileall -q --invalidation-mode checked-hash unionfs mountctl
# mount(8) runs mount.fuse3, which looks helpers up on a fixed PATH: make `unionfs` findable there.
if [ "$(id -u)" = 0 ]; then
  ln -sf "$PWD/.venv/bin/unionfs" /usr/local/bin/unionfs
  if [ -x .venv/bin/mountctl ]; then ln -sf "$PWD/.venv/bin/mountctl" /usr/local/bin/mountctl; fi
fi
