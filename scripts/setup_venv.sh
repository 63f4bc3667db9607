#!/usr/bin/env bash
# One-command setup on a plain Debian/Ubuntu box with Python 3.10-3.12 and no ROS installed.
# Creates .venv, installs the pinned ROS 2 kilted wheels and the ML stack, patches the wheels'
# CMake exports, builds msg/ with cmake into the venv prefix and makes `robometer_ros` importable.
# Idempotent: a second run only redoes the steps whose inputs changed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
STAMP=$VENV/.robometer-setup
t0=$(date +%s)

log() { printf '[setup] %s\n' "$*"; }

# 1. System packages: cmake/g++ for msg/, Mesa EGL for the offscreen Meta-World renderer.
need_apt=()
for p in cmake g++ libegl1 libegl-mesa0 libgl1-mesa-dri libgles2; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    log "apt-get install ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "missing system packages (run as root or install them): ${need_apt[*]}"; exit 1
  fi
fi

# 2. The venv and pinned Python dependencies (skipped when the requirement files did not change).
[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
req_hash=$(cat "$ROOT"/requirements/*.txt "$ROOT/setup.py" | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP.pip" 2>/dev/null)" != "$req_hash" ]; then
  log "pip install (requirements/*.txt)"
  # (grep drops the harmless "Location ... is ignored" lines some pip configs print per package)
  { "$VENV/bin/python" -m pip install -q --upgrade pip &&
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements/ros.txt" -r "$ROOT/requirements/core.txt" \
      -r "$ROOT/requirements/sim.txt" -r "$ROOT/requirements/dev.txt"; } 2>&1 | { grep -v 'is ignored: it is neither' || true; }
  [ "${PIPESTATUS[0]}" = 0 ] || { log "pip install failed"; exit 1; }
  echo "$req_hash" > "$STAMP.pip"
  rm -f "$STAMP.msg"   # message wheels may have been reinstalled: re-patch and rebuild
fi

# 3. The ros-* wheels' exported CMake targets point at the manylinux build container's Python.
PYINC=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
NPINC=$("$VENV/bin/python" -c "import numpy; print(numpy.get_include())")
files=$(grep -rl '/opt/python/cp3' "$VENV/share" --include='*.cmake' || true)
if [ -n "$files" ]; then
  log "patching $(echo "$files" | wc -w) wheel CMake exports"
  sed -i -E -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#${NPINC}#g" \
            -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${PYINC}#g" $files
fi

# 4. msg/ -> generated interfaces installed into the venv prefix (the venv is the ROS prefix).
msg_hash=$(cat "$ROOT"/msg/*.msg "$ROOT"/srv/*.srv "$ROOT/CMakeLists.txt" "$ROOT/package.xml" 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$STAMP.msg" 2>/dev/null)" != "$msg_hash" ]; then
  log "building msg/ with cmake"
  B=$ROOT/build/venv-msgs
  rm -rf "$B"; mkdir -p "$ROOT/build"
  export AMENT_PREFIX_PATH=$VENV
  cmake -S "$ROOT" -B "$B" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_PREFIX_PATH="$VENV" \
        -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF \
        -DROBOMETER_ROS_INSTALL_PYTHON_SOURCES=OFF > "$B.cmake.log" 2>&1 || { tail -40 "$B.cmake.log"; exit 1; }
  cmake --build "$B" -j"$(nproc)" > "$B.build.log" 2>&1 || { tail -40 "$B.build.log"; exit 1; }
  cmake --install "$B" > "$B.install.log" 2>&1 || { tail -40 "$B.install.log"; exit 1; }
  echo "$msg_hash" > "$STAMP.msg"
fi

# 5. The source tree first on sys.path: robometer_ros/__init__.py extends its __path__ with the
#    generated robometer_ros/msg + typesupport modules that step 4 installed into site-packages,
#    so edits to the sources take effect without reinstalling.
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
#    (ROBOMETER_ROS_INSTALLED_ONLY=1 turns this off, to test an installed copy from this venv.)
echo "import os, sys; os.environ.get('ROBOMETER_ROS_INSTALLED_ONLY') or sys.path.insert(0, '$ROOT')" \
  > "$SITE/robometer_ros_source.pth"

# Console scripts (robometer-train, robometer-export, ...): an editable install, redone only when setup.py changes.
if [ "$(cat "$STAMP.editable" 2>/dev/null)" != "$req_hash" ]; then
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT" > "$VENV/.robometer-editable.log" 2>&1 \
    || { cat "$VENV/.robometer-editable.log"; log "editable install failed"; exit 1; }
  echo "$req_hash" > "$STAMP.editable"
fi

# 6. Test data: the real Qwen3-VL vocabulary ships in the dashscope 2.0.2 wheel (2.4 MB; only its
#    qwen.tiktoken is read, dashscope is never installed). test/unit/test_released_compat.py skips without it.
TESTDATA=$VENV/share/robometer_ros_testdata
if [ ! -f "$TESTDATA/dashscope-2.0.2-py3-none-any.whl" ]; then
  log "pip download dashscope==2.0.2 (Qwen vocabulary for the released-model tests)"
  mkdir -p "$TESTDATA"
  "$VENV/bin/python" -m pip download -q --no-deps dashscope==2.0.2 -d "$TESTDATA" 2>&1 \
    | { grep -v 'is ignored: it is neither' || true; } || log "download failed; test_released_compat.py will skip"
fi
"$VENV/bin/python" -c "from robometer_ros.msg import StepReward, FailureFlag; import robometer_ros.model" \
  || { log "import check failed"; exit 1; }
log "done in $(( $(date +%s) - t0 )) s; venv $(du -sh "$VENV" | cut -f1)"
