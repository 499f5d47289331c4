#!/usr/bin/env bash
# A whole deployment-mode federation on this machine: one SuperLink and one SuperNode per
# center as separate processes on 127.0.0.1, talking TLS with node authentication (each center makes a
# key pair, the SuperLink admits only the registered public keys), training the smoke experiment.
#
#   scripts/local_federation.sh DATA_DIR OUT_DIR [key=value ...]
#
# DATA_DIR holds the centers, each a folder with a datalist.json (`medfound phantoms --out
# DATA_DIR`); every one joins. The key=value
# overrides go to `medfound run federate` (e.g. fed.rounds=3). OUT_DIR gets what simulation
# mode leaves (model/, metrics.json, server/state.pt, MLflow) plus certs/, keys/, logs/ and each
# center's work folder (centers/<center>/, with its audit log in audit/). Every process this
# script starts is stopped when it ends, also on failure or Ctrl-C. PORT (default 9092) is
# the SuperLink's port; the SuperNodes use PORT+2 and up for their local APIs. JOIN_ARGS adds
# options to every `medfound center join` (e.g. JOIN_ARGS=--no-worker). CENTER_THREADS
# (default: this machine's cores / the number of centers, at least 1) is each center's
# OpenMP/MKL thread count: the centers share this machine, and torch's default of one thread
# per core in every center oversubscribes it (5-7× slower training, benchmarks/federation.py).
set -euo pipefail
if [[ $# -lt 2 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
data=$(cd "$1" && pwd); out=$2; shift 2
here=$(cd "$(dirname "$0")" && pwd)
medfound=${MEDFOUND:-medfound}
port=${PORT:-9092}
# every center folder of DATA_DIR (one holding a datalist.json) joins, in name order
centers=()
for d in "$data"/*/; do [[ -f "$d/datalist.json" ]] && centers+=("$(basename "$d")"); done
if [[ ${#centers[@]} -eq 0 ]]; then
    echo "error: $data holds no center folder (none with a datalist.json) — generate some with medfound phantoms" >&2
    exit 2
fi
mkdir -p "$out/logs"; out=$(cd "$out" && pwd)
export FLWR_HOME="$out/.flwr-home"   # Flower's own state stays inside OUT_DIR

pids=()
cleanup() {
    # each one leads its own process group: stop it with everything it started
    for pid in "${pids[@]}"; do kill -- -"$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 -- -"$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 -- -"$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

[[ -f "$out/certs/ca.crt" ]] || "$here/make_certs.sh" "$out/certs"
setsid $medfound fed superlink --address "127.0.0.1:$port" --certs "$out/certs" --auth >"$out/logs/superlink.log" 2>&1 &
pids+=($!)
for i in $(seq 100); do   # wait until the SuperLink listens
    grep -q "Uvicorn running" "$out/logs/superlink.log" 2>/dev/null && break
    kill -0 "${pids[0]}" 2>/dev/null || { cat "$out/logs/superlink.log" >&2; exit 1; }
    sleep 0.2
done
pubs=()
for c in "${centers[@]}"; do   # each center's key pair; the coordinator registers the public keys
    [[ -f "$out/keys/$c.key" ]] || $medfound center keys --out "$out/keys" --center "$c" >/dev/null
    pubs+=("$out/keys/$c.pub")
done
$medfound fed register "${pubs[@]}" --superlink "127.0.0.1:$port" --root-certificates "$out/certs/ca.crt"
threads=${CENTER_THREADS:-$(( $(nproc) / ${#centers[@]} ))}
(( threads >= 1 )) || threads=1
for i in "${!centers[@]}"; do
    c=${centers[$i]}
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads setsid $medfound center join --superlink "127.0.0.1:$port" --data "$data/$c" --center "$c" \
        --work "$out/centers/$c" --root-certificates "$out/certs/ca.crt" \
        --auth-key "$out/keys/$c.key" --port $((port + 2 + i)) ${JOIN_ARGS:-} >"$out/logs/$c.log" 2>&1 &
    pids+=($!)
done
$medfound run federate fed.mode=deployment data.root="$data" \
    "fed.centers=[$(IFS=,; echo "${centers[*]}")]" fed.min_centers=${#centers[@]} \
    experiment=phantoms_smoke fed.deployment.superlink="127.0.0.1:$port" \
    fed.deployment.root_certificates="$out/certs/ca.crt" out_dir="$out" "$@"
echo "local federation done: $out (model/, or encoder/ with task=pretrain); audit logs: $out/centers/*/audit/"
