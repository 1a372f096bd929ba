#!/usr/bin/env bash
# A user's install, as the README says it: a regular (non-editable) `pip install .` into a
# second venv (pip's cache makes it quick), README command 1 verbatim from the repo root and
# from another folder, then `serve` from another folder answering one request.
# Usage: .ci/install_check.sh VENV_DIR   (run from the repo root; models already in the cache)
set -euo pipefail
REPO=$(pwd)
VENV=${1:?venv folder}
PY=${PYTHON:-python3}
t0=$SECONDS
rm -rf "$VENV"
"$PY" -m venv "$VENV"
. "$VENV/bin/activate"
PROMPT="The capital of France is"
out=$(mktemp)
# --- README command 1, verbatim, from the repo root ---
(pip install -q . && python -m tinyinfer -p "The capital of France is" -n 32) >"$out"
grep -q "^$PROMPT" "$out" || { echo "install check: no answer from the repo root"; cat "$out"; exit 1; }
# an answer: some text after the prompt (sampling may end it early: " Paris." then the end token is fine)
tail -c +$((${#PROMPT} + 1)) "$out" | tr -d '[:space:]' | grep -q . || { echo "install check: empty answer"; exit 1; }
echo "install check: command 1 from the repo root: ok ($((SECONDS - t0)) s)"
# --- the same from another folder: the installed package, not the source tree ---
other=$(mktemp -d)
(cd "$other" && python -c "import tinyinfer; assert 'site-packages' in tinyinfer.__file__, tinyinfer.__file__" \
   && python -m tinyinfer -p "The capital of France is" -n 32) >"$out"
grep -q "^$PROMPT" "$out" || { echo "install check: no answer from $other"; cat "$out"; exit 1; }
echo "install check: command 1 from $other: ok ($((SECONDS - t0)) s)"
# --- serve from another folder, one request ---
pip install -q ".[server]"
port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$other" && exec python -m tinyinfer serve --port "$port" -c 512 --no-access-log --log-level warning) &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
python - "$port" <<'PY'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(600):
    try:
        if json.load(urllib.request.urlopen(base + "/health", timeout=2)).get("status") == "ok":
            break
    except OSError:
        pass
    time.sleep(0.5)
else:
    sys.exit("install check: the server never became healthy")
req = urllib.request.Request(base + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                             data=json.dumps({"prompt": "The capital of France is", "max_tokens": 8,
                                              "temperature": 0}).encode())
out = json.load(urllib.request.urlopen(req, timeout=120))
text = out["choices"][0]["text"]
assert text.strip(), out
print(f"install check: serve answered {text!r}")
PY
kill $pid; wait $pid 2>/dev/null || true
trap - EXIT
deactivate
echo "install check done in $((SECONDS - t0)) s"
