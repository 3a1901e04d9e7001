#!/usr/bin/env bash
# The gateway's load figures (docs/bench.md, "Gateway"): how many sessions `ferry-gateway`
# creates per second over HTTPS with keep-alive, and the p99 latency of the create call at half
# that rate (fixed rate, latency corrected for coordinated omission, as wrk2 does).
#
# Loopback only and bounded in time: it builds the release binary, generates a throw-away CA,
# certificate, signing key and API key in a temporary directory, starts the gateway on
# 127.0.0.1 (memory backend, rate limits raised so they do not cap the figure, the audit log at
# `info` into a file as in production), runs `oha` twice for DURATION seconds, prints the
# figures, and stops the gateway by its pid.
#
#   bench/scripts/gateway-load.sh                # 2 x 15 s, 32 connections
#   DURATION=30 CONNECTIONS=64 bench/scripts/gateway-load.sh
#   PIN=1 bench/scripts/gateway-load.sh          # gateway on CPU 0 only, oha on CPU 1
#   PERF_OUT=/tmp/gw.perf bench/scripts/gateway-load.sh   # perf record -g the gateway in run 1
#                                                # (then: perf report -i /tmp/gw.perf --no-children)
#
# Needs oha (`cargo install oha --locked`; OHA=/path/to/oha if not on PATH), openssl, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-15}
CONNECTIONS=${CONNECTIONS:-32}
OHA=${OHA:-oha}
PIN=${PIN:-0}
PERF_OUT=${PERF_OUT:-}
case "$DURATION" in '' | *[!0-9]*) echo "DURATION must be whole seconds" >&2; exit 2 ;; esac
if [ "$DURATION" -lt 1 ] || [ "$DURATION" -gt 300 ]; then
    echo "DURATION must be 1-300 s" >&2
    exit 2
fi
command -v "$OHA" >/dev/null || {
    echo "oha not found: cargo install oha --locked (or OHA=/path/to/oha)" >&2
    exit 2
}
for tool in openssl python3 base64; do
    command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 2; }
done

cargo build --release --locked -p ferry-gateway
BIN=$PWD/target/release/ferry-gateway

work=$(mktemp -d /tmp/ferry-gateway-load.XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# A CA and a certificate for 127.0.0.1, valid for a day.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=ferry-load-ca -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj /CN=localhost -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
    -extfile san.ext -out tls.crt 2>/dev/null
chmod 600 tls.key
"$BIN" keygen --out gateway-1.key >/dev/null
apikey=$("$BIN" apikey new --id load --scope 'create:*')
key=$(sed -n 2p <<<"$apikey" | tr -d ' ')
api_key_table=$(sed -n '/^\[\[api_keys\]\]/,$p' <<<"$apikey")
# No relay runs: a listed relay with probing off is handed out as healthy. Any 32 bytes are an
# X25519 public key to seal slot secrets to.
relay_public=$(head -c 32 /dev/urandom | base64)

cat >gateway.toml <<EOF
[server]
listen = "127.0.0.1:0"

[tls]
cert = "tls.crt"
key = "tls.key"

[signing]
active_kid = 1

[[signing.keys]]
kid = 1
key_file = "gateway-1.key"

$api_key_table

[[relays]]
id = 1
address = "127.0.0.1:7000"
public_key = "$relay_public"

[relay_health]
probe = false

[limits]
per_ip_rate = 1000000.0
per_ip_burst = 1000000
per_key_rate = 1000000.0
per_key_burst = 1000000

[state]
max_sessions = 100000000

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"
EOF

gateway_cmd=("$BIN" --config gateway.toml)
oha_cmd=("$OHA")
if [ "$PIN" = 1 ]; then
    gateway_cmd=(taskset -c 0 "${gateway_cmd[@]}")
    oha_cmd=(taskset -c 1 "$OHA")
fi
"${gateway_cmd[@]}" >gateway.out 2>gateway.log &
pid=$!
for _ in $(seq 100); do
    grep -q 'ferry-gateway listening' gateway.out 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat gateway.log >&2; exit 1; }
    sleep 0.1
done
public=$(sed -n 's/.*public=https:\/\/\([^ ]*\).*/\1/p' gateway.out)
admin=$(sed -n 's/.*admin=http:\/\/\([^ ]*\).*/\1/p' gateway.out)
[ -n "$public" ] || { echo "the gateway did not start" >&2; cat gateway.log >&2; exit 1; }
url="https://$public/v1/sessions"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }

# run NAME [oha options...]: one run of DURATION seconds; writes NAME.json and NAME.cpu.
run() {
    local name=$1
    shift
    local before after perf_pid=
    if [ -n "$PERF_OUT" ] && [ "$name" = max ]; then
        perf record -e cpu-clock -g -p "$pid" -o "$PERF_OUT" -- sleep "$DURATION" \
            >/dev/null 2>&1 &
        perf_pid=$!
    fi
    before=$(cpu_ticks)
    "${oha_cmd[@]}" -z "${DURATION}s" -w -c "$CONNECTIONS" --no-tui --output-format json \
        --cacert ca.crt -m POST -H "Authorization: Bearer $key" -T application/json -d '{}' \
        "$@" "$url" >"$name.json"
    after=$(cpu_ticks)
    if [ -n "$perf_pid" ]; then wait "$perf_pid" || true; fi
    echo $((after - before)) >"$name.cpu"
}

report() {
    python3 - "$@" <<'PY'
import json, os, sys
name, duration, ticks_per_sec = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
r = json.load(open(name + ".json"))
codes = r.get("statusCodeDistribution", {})
created = int(codes.get("201", 0))
other = sum(int(n) for c, n in codes.items() if c != "201")
errors = sum(int(n) for n in r.get("errorDistribution", {}).values())
pct = r["latencyPercentiles"]
cpu = int(open(name + ".cpu").read()) / ticks_per_sec
ms = lambda v: "-" if v is None else f"{v * 1000:.2f} ms"
print(f"  created {created} sessions in {duration:.0f} s: {created / duration:.0f}/s"
      f" ({other} other answers, {errors} errors)")
print(f"  latency p50 {ms(pct.get('p50'))}, p90 {ms(pct.get('p90'))}, p99 {ms(pct.get('p99'))},"
      f" p99.9 {ms(pct.get('p99.9'))}, max {ms(r['summary'].get('slowest'))}")
if created:
    print(f"  gateway CPU {cpu:.1f} s: {cpu * 1e6 / created:.0f} us per session")
with open(name + ".rate", "w") as f:
    f.write(str(created / duration))
PY
}

hz=$(getconf CLK_TCK)
echo "ferry-gateway on $public (HTTPS, keep-alive, memory backend, audit log at info)"
echo "oha: $CONNECTIONS connections, ${DURATION} s per run$([ "$PIN" = 1 ] && echo ', gateway on CPU 0, oha on CPU 1')"
echo
echo "1. session creations per second (as fast as it answers):"
run max
report max "$DURATION" "$hz"
rate=$(python3 -c "print(max(1, int(float(open('max.rate').read()) / 2)))")
echo
echo "2. create latency at half that rate, $rate/s fixed (latency corrected):"
run half -q "$rate" --latency-correction
report half "$DURATION" "$hz"
echo
curl_metrics=$(python3 - "$admin" <<'PY'
import sys, urllib.request
page = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
for line in page.splitlines():
    if line.startswith(("ferry_gateway_sessions_created_total", "ferry_gateway_rate_limited_total")):
        print("  " + line)
PY
)
echo "gateway metrics after both runs:"
echo "$curl_metrics"
