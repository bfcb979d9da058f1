# Shared by gpu_check.sh and cpu_check.sh (sourced): the interpreter, `samedge`, output steps and
# one exit status for the whole check, the worst step's: 2 (error) over 1 (a gate failed) over 0.
PY=${PYTHON:-python3}  # the interpreter samedge is installed in
samedge() { "$PY" -m samedge.cli "$@"; }
status=0
step() { echo; echo "== $*  ($(date -u +%H:%M:%S))"; }
record() {
  local code=$1
  if [ "$code" -gt "$status" ]; then status=$code; fi
  if [ "$code" -ge 2 ]; then echo "!! failed (exit $code)"; fi
}
