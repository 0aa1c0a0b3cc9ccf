#!/usr/bin/env bash
# ARM (Raspberry Pi) verification on an x86-64 machine, by emulation: correctness only, never latency.
#
#   sudo bash bench/arm_check.sh BUNDLE_DIR [WORKDIR]
#
# Sets up (once, cached in WORKDIR, ~460 MB, ~3 min) an emulated aarch64 Debian bookworm with the aarch64
# onnxruntime wheel, runs bench/run_edge.py on the bundle with the Cortex-A72 (Pi 4) and Cortex-A76 (Pi 5) CPU
# models, checks that the optimised graph is fully integer there (run_edge.py exits 1 otherwise) and that the
# logits are bit-identical to the numpy interpreter run with aarch64's arithmetic (IntegerInterpreter(..., cpu="aarch64");
# QLinearAdd rounds differently from x86-64 there), and counts the images whose logits differ from the x86 run.
# Needs root, qemu-user-static and debootstrap, and the qnn package installed on the host.
# Follows ../shared/docs/engineering-notes.md: no /sys in the chroot (onnxruntime segfaults under qemu with it).
# Exit codes: 0 pass, 1 check failed (float ops on ARM or logits differ from the aarch64 model), 3 emulation environment could
# not be set up here (not root, no network for debootstrap/pip, no binfmt_misc): nothing was checked.
# Under qemu-user, /proc/cpuinfo is the host's: the emulated CPU model is the QEMU_CPU value run_edge.py prints.
set -euo pipefail
envfail() { echo "ARM check: could not set up emulation: $*" >&2; exit 3; }
[ "$(id -u)" = 0 ] || envfail "needs root (chroot, mount)"
BUNDLE=$(realpath "${1:?usage: arm_check.sh BUNDLE_DIR [WORKDIR]}")
WORK=$(realpath -m "${2:-/tmp/qnn-arm}")
PROJ=$(cd "$(dirname "$0")/.." && pwd)
ROOTFS="$WORK/rootfs"
ORT_VERSION=$(python3 -c "import onnxruntime; print(onnxruntime.__version__)")
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y qemu-user-static debootstrap >/dev/null || envfail "apt-get install qemu-user-static debootstrap failed"
fi
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  echo "== debootstrap aarch64 bookworm into $ROOTFS"
  mkdir -p "$ROOTFS"
  debootstrap --arch=arm64 --variant=minbase --include=python3 --foreign bookworm "$ROOTFS" "$MIRROR" >/dev/null \
    || envfail "debootstrap from $MIRROR failed"
  cp "$(command -v qemu-aarch64-static)" "$ROOTFS/usr/bin/"
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    { mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; } \
      || envfail "cannot mount binfmt_misc"
    if [ -x /usr/lib/systemd/systemd-binfmt ]; then /usr/lib/systemd/systemd-binfmt /usr/lib/binfmt.d/qemu-aarch64.conf;
    else update-binfmts --enable qemu-aarch64; fi || envfail "cannot register qemu-aarch64 with binfmt_misc"
  fi
  chroot "$ROOTFS" /debootstrap/debootstrap --second-stage >/dev/null || { rm -rf "$ROOTFS"; envfail "debootstrap second stage failed"; }
fi
if [ ! -d "$ROOTFS/opt/edge/onnxruntime" ]; then
  echo "== aarch64 wheels: onnxruntime $ORT_VERSION + numpy"
  PLAT=(--only-binary=:all: --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64
        --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
  pip download -q "${PLAT[@]}" -d "$WORK/wheels" "onnxruntime==$ORT_VERSION" numpy 2>/dev/null || envfail "pip download of aarch64 wheels failed"
  pip install -q --no-index --find-links "$WORK/wheels" "${PLAT[@]}" --target "$ROOTFS/opt/edge" "onnxruntime==$ORT_VERSION" numpy 2>/dev/null \
    || envfail "installing aarch64 wheels failed"
fi
mkdir -p "$ROOTFS/mnt/project" "$ROOTFS/mnt/bundle" "$ROOTFS/mnt/out" "$ROOTFS/proc"
mountpoint -q "$ROOTFS/mnt/project" || mount --bind "$PROJ" "$ROOTFS/mnt/project"
mountpoint -q "$ROOTFS/mnt/bundle" || mount --bind "$BUNDLE" "$ROOTFS/mnt/bundle"
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
cleanup() { umount "$ROOTFS/mnt/project" "$ROOTFS/mnt/bundle" "$ROOTFS/proc" 2>/dev/null || true; }
trap cleanup EXIT

echo "== x86-64 reference run"
python3 "$PROJ/bench/run_edge.py" --bundle "$BUNDLE" --threads 1 --skip-latency --save-logits "$WORK/x86_logits.npz" --json "$WORK/x86.json" >/dev/null
status=0
for CPU in cortex-a72 cortex-a76; do
  echo "== emulated $CPU"
  QEMU_CPU=$CPU chroot "$ROOTFS" env PYTHONPATH=/opt/edge QEMU_CPU=$CPU python3 /mnt/project/bench/run_edge.py \
      --bundle /mnt/bundle --threads 1 --skip-latency --save-logits /mnt/out/$CPU.npz --json /mnt/out/$CPU.json || status=1
  python3 - "$WORK/x86_logits.npz" "$ROOTFS/mnt/out/$CPU.npz" "$CPU" "$BUNDLE/model.onnx" <<'PY' || status=1
import sys, numpy as np
from qnn.kernels.interpreter import IntegerInterpreter
x86, arm = np.load(sys.argv[1]), np.load(sys.argv[2])
sets = sorted(k for k in x86.files if not k.startswith("input_"))
ok = sorted(arm.files) == sorted(x86.files) and all(np.array_equal(x86[f"input_{k}"], arm[f"input_{k}"]) for k in sets)
interp = IntegerInterpreter(sys.argv[4], cpu="aarch64")
ok = ok and all(np.array_equal(arm[k], interp.run(arm[f"input_{k}"])) for k in sets)
# x86-64 and aarch64 ORT round QLinearAdd differently (float FMA vs fixed point): equal logits are not required
n_diff = sum(int((~(x86[k] == arm[k]).all(1)).sum()) for k in sets)
print(f"{sys.argv[3]}: logits bit-identical to the aarch64 arithmetic model: {ok}; "
      f"images whose logits differ from x86-64's: {n_diff} ({', '.join(sets)})")
sys.exit(0 if ok else 1)
PY
done
cp "$ROOTFS"/mnt/out/*.json "$WORK/" 2>/dev/null || true
[ $status -eq 0 ] && echo "ARM check: PASS" || echo "ARM check: FAIL"
exit $status
