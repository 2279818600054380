#!/usr/bin/env bash
# Make sure Fashion-MNIST is present: $EEBENCH_DATA, the Debian package, or a torchvision download.
set -euo pipefail
python=${1:-python3}
debian=/usr/share/datasets/fashion-mnist
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] && [ -f "$1/t10k-labels-idx1-ubyte.gz" ]; }

if [ -n "${EEBENCH_DATA:-}" ] && { have "$EEBENCH_DATA" || have "$EEBENCH_DATA/fashion-mnist"; }; then exit 0; fi
if have "$debian"; then exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Installing the Debian package dataset-fashion-mnist ..."
  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1) \
    || (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)
  have "$debian" && exit 0
fi
echo "Trying a torchvision download of Fashion-MNIST into ~/.cache/eebench/data ..."
if "$python" - <<'PY'
import sys
try:
    from eebench_plugins.datasets import fashion_mnist
    fashion_mnist(download=True)
except Exception as exc:  # one line, then the message below says what to do
    print(f"torchvision download failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    sys.exit(1)
PY
then exit 0; fi
cat >&2 <<'MSG'
eebench: error: Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist`
(files under /usr/share/datasets/fashion-mnist/), or put the four IDX .gz files in a folder and
set EEBENCH_DATA to it.
MSG
exit 2
