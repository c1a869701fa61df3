#!/usr/bin/env bash
# Drives the release binary with swaks (a real SMTP client) through the core dialogues. Each
# dialogue uses its own source address in 127.0.0.0/8 so the gate sees distinct clients.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v swaks >/dev/null || { echo "swaks: not installed (run: bash ci/setup.sh swaks)"; exit 1; }
cargo build --release -q -p gatekeeper
bin=target/release/gatekeeper
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
log="$work/gatekeeper.log"
# STARTTLS with a self-signed ECDSA P-256 certificate made here: the example configuration with
# its [tls] cert and key set.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=gatekeeper.example.test" \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
# The metrics endpoint on too (its example line uncommented, on the next port).
metrics_port=$((port + 1))
sed -e "s|^# cert = .*|cert = \"$work/cert.pem\"|" -e "s|^# key = .*|key = \"$work/key.pem\"|" \
  -e "s|^# listen = \"127.0.0.1:9325\"|listen = \"127.0.0.1:$metrics_port\"|" \
  examples/gatekeeper.toml >"$work/gatekeeper.toml"
grep -q "^listen = \"127.0.0.1:$metrics_port\"" "$work/gatekeeper.toml"
grep -q "^cert = " "$work/gatekeeper.toml" && grep -q "^key = " "$work/gatekeeper.toml"
"$bin" serve --config "$work/gatekeeper.toml" --listen "127.0.0.1:$port" --state-dir "$work/state" 2>"$log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
# That probe connection used 127.0.0.1's gate slot; the dialogues below use other addresses.

pass=0 fail=0
check() { # name, expected regex, swaks transcript
  if grep -qE -- "$2" <<<"$3"; then
    pass=$((pass + 1)); echo "ok   $1"
  else
    fail=$((fail + 1)); echo "FAIL $1: expected /$2/ in:"; sed 's/^/     /' <<<"$3"
  fi
}
sw() { # source address, swaks args...
  local src=$1; shift
  swaks --server "127.0.0.1:$port" --local-interface "$src" --helo client.test --timeout 10 "$@" 2>&1 || true
}

out=$(sw 127.0.0.21 --from '<>' --to nobody@example.test --quit-after RCPT)
check "<> to an unknown user: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
out=$(sw 127.0.0.21 --from '<>' --to alice@example.test --quit-after RCPT)
check "... and no ban: the next connection is only rate limited (421, not 554)" '<\*\* +421 4\.7\.0' "$out"

out=$(sw 127.0.0.22 --from nobody@example.test --to alice@example.test --quit-after RCPT)
check "forged local sender: 550 5.7.1" '<\*\* +550 5\.7\.1' "$out"
out=$(sw 127.0.0.22 --from '<>' --to alice@example.test --quit-after RCPT)
check "... and banned: 554 greeting" '<\*\* +554 5\.7\.1' "$out"

out=$(sw 127.0.0.23 --from foo --to alice@example.test --quit-after RCPT)
check "sender without a domain: 553 5.1.7" '<\*\* +553 5\.1\.7' "$out"

out=$(sw 127.0.0.24 --from someone@elsewhere.test --to victim@elsewhere.test --quit-after RCPT)
check "relay denied: 554 5.7.1" '<\*\* +554 5\.7\.1' "$out"

out=$(sw 127.0.0.25 --from '<>' --to postmaster@example.test --quit-after RCPT)
check "postmaster always accepted" '<- +250 2\.1\.5' "$out"

out=$(sw 127.0.0.26 --from someone@elsewhere.test --to nobody@example.test,nobody2@example.test --quit-after RCPT)
check "two unknown recipients with a real sender: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
check "... banned (B4) at the second: 421 ends the session" '<\*\* +421 4\.7\.0' "$out"
out=$(sw 127.0.0.26 --from '<>' --to alice@example.test --quit-after RCPT)
check "... and refused as banned: 554 greeting" '<\*\* +554 5\.7\.1' "$out"

out=$(sw 127.0.0.29 --from double-bounce@remote.test --to q8x7z3@example.test --quit-after RCPT)
check "Postfix-style probe of an unknown user: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
out=$(sw 127.0.0.29 --from '<>' --to alice@example.test --quit-after RCPT)
check "... and no ban: the next connection is only rate limited (421, not 554)" '<\*\* +421 4\.7\.0' "$out"

out=$(sw 127.0.0.30 --from news@elsewhere.test --to alice+news@example.test --quit-after RCPT)
check "recipient delimiter: alice+news@ is alice@ (250)" '<- +250 2\.1\.5' "$out"

eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
out=$(sw 127.0.0.31 --from '<>' --to alice@example.test --header "Subject: Undelivered Mail Returned to Sender" --body "$eicar")
check "virus in a bounce (<>): 554 5.7.1" '<\*\* +554 5\.7\.1' "$out"
out=$(sw 127.0.0.31 --from '<>' --to alice@example.test --quit-after RCPT)
check "... and no ban: the next connection is only rate limited (421, not 554)" '<\*\* +421 4\.7\.0' "$out"
out=$(sw 127.0.0.32 --from someone@elsewhere.test --to alice@example.test --header "Subject: invoice" --body "$eicar")
check "virus from a real sender: 554 5.7.1" '<\*\* +554 5\.7\.1' "$out"
check "... banned (B3): 421 ends the session" '<\*\* +421 4\.7\.0' "$out"
out=$(sw 127.0.0.32 --from '<>' --to alice@example.test --quit-after RCPT)
check "... and refused as banned: 554 greeting" '<\*\* +554 5\.7\.1' "$out"

out=$(sw 127.0.0.27 --pipeline --from '<>' --to alice@example.test --header "Subject: swaks ci" --body "hello from swaks")
check "pipelined message to alice: 250 queued" '<- +250 2\.0\.0 Ok: queued as' "$out"
spooled=$(grep -l "hello from swaks" "$work"/state/maildir/new/* 2>/dev/null | wc -l)
check "... and it is in the Maildir spool" '^1$' "$spooled"

out=$(sw 127.0.0.33 --from '<>' --to alice@example.test --quit-after EHLO)
check "STARTTLS advertised in EHLO" '<- +250.STARTTLS' "$out"
out=$(sw 127.0.0.34 --tls --from '<>' --to alice@example.test --header "Subject: swaks tls" --body "hello over tls")
check "swaks --tls: the handshake" 'TLS started with cipher' "$out"
check "... the message over TLS: 250 queued" '<~ +250 2\.0\.0 Ok: queued as' "$out"
tls_spooled=$(grep -l "hello over tls" "$work"/state/maildir/new/* 2>/dev/null | xargs -r grep -l "with ESMTPS id" | wc -l)
check "... in the spool, Received: ... with ESMTPS" '^1$' "$tls_spooled"

out=$(sw 127.0.0.28 --from '<>' --to bob@example.test --quit-after RCPT)
check "first connection from an address: 220" '<- +220 ' "$out"
out=$(sw 127.0.0.28 --from '<>' --to bob@example.test --quit-after RCPT)
check "second within the window: 421 (G1)" '<\*\* +421 4\.7\.0' "$out"

verdicts=$(grep -c 'verdict' "$log" || true)
check "one log event per verdict" '^[1-9][0-9]*$' "$verdicts"

# The metrics endpoint (curl where there is one, bash's /dev/tcp otherwise): rule-labelled
# counters moved by what the dialogues above did.
scrape() {
  if command -v curl >/dev/null; then
    curl -sf "http://127.0.0.1:$metrics_port/metrics"
  else
    exec 3<>"/dev/tcp/127.0.0.1/$metrics_port"
    printf 'GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n' >&3
    sed '1,/^\r$/d' <&3
    exec 3<&-
  fi
}
metrics=$(scrape || true)
check "metrics: E2's 550s by rule and code" '^gatekeeper_verdicts_total\{rule="E2",verdict="reject",code="550"\} [1-9]' "$metrics"
check "metrics: one B1 ban (the forged local sender)" '^gatekeeper_bans_total\{reason="B1"\} 1$' "$metrics"
check "metrics: one B3 ban (the virus from a real sender)" '^gatekeeper_bans_total\{reason="B3"\} 1$' "$metrics"
check "metrics: one B4 ban (two unknown recipients)" '^gatekeeper_bans_total\{reason="B4"\} 1$' "$metrics"
check "metrics: refusals of banned clients (554)" '^gatekeeper_connections_refused_total\{reason="banned"\} [1-9]' "$metrics"
check "metrics: the swaks --tls handshake" '^gatekeeper_tls_handshakes_total\{result="completed"\} 1$' "$metrics"
check "metrics: infected scans" '^gatekeeper_scans_total\{result="infected"\} 2$' "$metrics"

echo "swaks: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
