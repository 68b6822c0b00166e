#!/usr/bin/env bash
# The installed package stands alone: build the wheel from the work tree, install it into a fresh venv,
# and run a tiny `medsynth run` from an empty folder outside the repository (issue 10: "It installs
# like a package"). Uses pip's cache; about a minute once the cache holds the dependencies.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/medsynth-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
VENV="$WORK/venv"
step() { printf '\n== wheel check: %s\n' "$*"; }

step "build the wheel from the files git would submit (a copy, so nothing stale in build/ gets in)"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
    | (cd "$ROOT" && tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$WORK/src"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" wheel -qq --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/medsynth-*.whl)"

step "the wheel holds medsynth alone, with every config under medsynth/conf"
"$PYTHON" - "$WHEEL" "$ROOT/conf" <<'EOF'
import sys
import zipfile
from pathlib import Path

names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
assert tops == {"medsynth"}, f"top-level names besides medsynth in the wheel: {sorted(tops)}"
conf = Path(sys.argv[2])
missing = [p for p in conf.rglob("*.yaml") if f"medsynth/conf/{p.relative_to(conf).as_posix()}" not in names]
assert not missing, f"configs missing from the wheel: {missing}"
print(f"{len(names)} files; top level: medsynth; {sum(n.startswith('medsynth/conf/') for n in names)} configs")
EOF

step "install it into a fresh venv"
# Without a GPU, the CPU build of torch this kind of machine provides (as the Makefile does).
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    "$VENV/bin/pip" install -qq "${TORCH_SPEC:-torch==2.13.0}"
fi
"$VENV/bin/pip" install -qq "$WHEEL"

cd "$WORK/run"
step "from $PWD: the configs come from the installed package, every preset composes, no 'pipelines' package"
"$VENV/bin/python" - <<'EOF'
import importlib.util
import sysconfig
from pathlib import Path

from medsynth.config import compose, config_dir

site = Path(sysconfig.get_paths()["purelib"]).resolve()
assert config_dir() == site / "medsynth" / "conf", config_dir()
assert importlib.util.find_spec("pipelines") is None, "a top-level 'pipelines' package is installed"
presets = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
for preset in presets:
    compose([f"experiment={preset}"])
print(f"config folder {config_dir()}; presets compose: {', '.join(presets)}")
EOF

step "a config mistake is one line and exit status 2"
status=0
"$VENV/bin/medsynth" train trainer.max_stepz=3 2>"$WORK/error.txt" || status=$?
cat "$WORK/error.txt"
[ "$status" -eq 2 ] && [ "$(grep -c . "$WORK/error.txt")" -eq 1 ] && grep -q "trainer.max_stepz" "$WORK/error.txt"

step "medsynth run with tiny overrides (tests/conftest.py's TINY)"
mapfile -t TINY < <("$PYTHON" - "$ROOT/tests/conftest.py" <<'EOF'
import ast
import sys

tree = ast.parse(open(sys.argv[1]).read())
node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "TINY")
print("\n".join(ast.literal_eval(node.value)))
EOF
)
"$VENV/bin/medsynth" run "${TINY[@]}" "data.spacing=[12.0,12.0,6.0]" device=cpu \
    "paths.output=$WORK/run/out" "mlflow.tracking_uri=sqlite:///$WORK/run/mlflow.db"
for file in data/manifest.json checkpoints/last.pt synthetic/manifest.csv evaluation/metrics.json; do
    test -s "$WORK/run/out/$file" || { echo "wheel check: missing output $file" >&2; exit 1; }
done
step "passed: the wheel installs alone and runs the pipeline from $WORK/run"
