#!/usr/bin/env bash
# Log replay (issue 17) against a log written by a real Postfix: Debian's Postfix on loopback,
# a private instance with a main.cf written here (nothing of the system's Postfix is touched),
# logging through postlog (`maillog_file`, Postfix >= 3.4: no syslog needed), driven by swaks
# and smtp-source through a scripted mix of honest mail, bounces and spam; then
# `gatekeeper-sim replay` on that log, with its counts checked against the script.
#
#   bash ci/replay-postfix.sh                       # builds the debug gatekeeper-sim
#   SIM_BIN=target/release/gatekeeper-sim bash ci/replay-postfix.sh
#   SAMPLE=sim/tests/data/postfix-sample.log bash ci/replay-postfix.sh
#       # a bigger mix (a few thousand lines), its log copied there: the regression fixture
#
# The Postfix set-up is copied from ci/postfix-integration.sh (not shared: that script's
# instance carries the gatekeeper as policy service and milter; this one is a bare MTA).
# Fails (never skips) when postfix or swaks is missing and GATEKEEPER_REQUIRE_TOOLS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/postfix-private.sh
if ! command -v postfix >/dev/null || ! command -v swaks >/dev/null || ! command -v jq >/dev/null; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  bash ci/setup.sh postfix swaks jq || true
fi
for tool in postfix swaks smtp-source jq; do
  if ! command -v $tool >/dev/null; then
    if [ "${GATEKEEPER_REQUIRE_TOOLS:-0}" = 1 ]; then
      echo "replay-postfix: $tool is not installed (bash ci/setup.sh postfix swaks jq)" >&2; exit 1
    fi
    echo "replay-postfix: $tool is not installed; skipped (GATEKEEPER_REQUIRE_TOOLS=1 makes this fail)"; exit 0
  fi
done
sim=${SIM_BIN:-}
if [ -z "$sim" ]; then
  cargo build -q -p gatekeeper-sim
  sim=target/debug/gatekeeper-sim
fi
sim=$(realpath "$sim")
work=$(mktemp -d)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
etc=$work/etc
cleanup() {
  [ -f "$etc/main.cf" ] && postfix -c "$etc" stop >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
wait_port() { # address, port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "replay-postfix: postfix did not start on $1:$2" >&2; return 1
}

# Postfix: one smtpd on loopback, Debian's services unchrooted, the log through postlogd.
mkdir -p "$etc" "$work/queue" "$work/data" "$work/mail"
chown postfix "$work/data" "$work/mail"
cat >"$etc/master.cf" <<EOF2
127.0.0.1:$port inet n - n - - smtpd
EOF2
postfix_daemons >>"$etc/master.cf"
cp /usr/share/postfix/main.cf.debian "$etc/main.cf"
postconf -c "$etc" -e "smtpd_relay_restrictions=permit_mynetworks permit_sasl_authenticated defer_unauth_destination"
# Virtual mailboxes for example.test (alice, bob, postmaster); loopback clients stand for the
# Internet (no trusted network); no rate limits (anvil's defaults would refuse smtp-source).
postfix_site "$etc" "$work"
postconf -c "$etc" -e smtpd_client_connection_rate_limit=0 smtpd_client_message_rate_limit=0 \
  smtpd_error_sleep_time=0 smtpd_soft_error_limit=100 smtpd_hard_error_limit=100
printf '%s %s/\n' alice@example.test alice bob@example.test bob postmaster@example.test postmaster >"$etc/users"
if ! script -qec "postfix -c '$etc' check && postfix -c '$etc' start" "$work/start.log" >/dev/null; then
  echo "replay-postfix: postfix did not start:" >&2; tr -d '\r' <"$work/start.log" >&2; exit 1
fi
wait_port 127.0.0.1 "$port"

sw() { # source address, swaks args...
  local src=$1; shift
  swaks --server "127.0.0.1:$port" --local-interface "$src" --helo "h-${src//./-}.client.test" --timeout 30 "$@" \
    >>"$work/swaks.log" 2>&1 || true
}

# The scripted mix. Scale: 1 (CI), or more for the sample fixture.
n=${SCALE:-1}
[ -n "${SAMPLE:-}" ] && n=${SCALE:-10}
H=$((6 * n)) B=$((3 * n)) K=$((4 * n)) F=$((3 * n)) D=$((3 * n)) S=4
# Honest mail: one message each from its own address, sender at a remote domain.
for i in $(seq "$H"); do
  sw "127.0.1.$((i % 250 + 1))" --from "user$i@d$((i % 7)).remote.test" --to alice@example.test --body "hello $i"
done
# Bounces to real users (<>), from MTAs.
for i in $(seq "$B"); do sw "127.0.2.$((i % 250 + 1))" --from '<>' --to bob@example.test --body "bounce $i"; done
# Backscatter: <> to users that do not exist.
for i in $(seq "$K"); do sw "127.0.3.$((i % 250 + 1))" --from '<>' --to "gone$i@example.test" --quit-after RCPT; done
# Forged local senders (Postfix takes them: no reject_unlisted_sender here).
for i in $(seq "$F"); do
  sw "127.0.4.$((i % 250 + 1))" --from "nobody$i@example.test" --to alice@example.test --body "spam $i"
done
# Dictionary attacks: two unknown recipients each.
for i in $(seq "$D"); do
  sw "127.0.5.$((i % 250 + 1))" --from "x$i@spam.test" --to "a$i@example.test,b$i@example.test" --quit-after RCPT
done
# An honest client whose user mistypes one recipient, then writes again: Postfix takes both.
sw 127.0.6.1 --from carol@d1.remote.test --to caorl@example.test,alice@example.test --body "typo"
sleep 1.1 # the next one logged a second later (syslog stamps have whole seconds)
sw 127.0.6.1 --from carol@d1.remote.test --to alice@example.test --body "again"
# smtp-source: S messages in S sessions at once from one address (127.0.0.1): G1's meat.
smtp-source -s "$S" -m "$S" -f burst@d2.remote.test -t bob@example.test -M client.burst.test "127.0.0.1:$port" \
  >>"$work/smtp-source.log" 2>&1
if [ -n "${SAMPLE:-}" ] && command -v gcc >/dev/null; then
  # The sample's bulk: 300 honest sessions, each from its own address (the LD_PRELOAD shim
  # of the load benchmark binds every connection to the next 127.1.x.y).
  gcc -O2 -shared -fPIC -o "$work/srcaddr.so" ci/postfix-srcaddr.c -ldl
  echo 0 >"$work/sources"
  SRCADDR_STATE="$work/sources" LD_PRELOAD="$work/srcaddr.so" \
    smtp-source -s 10 -m 300 -f news@d3.remote.test -t alice@example.test -M bulk.client.test "127.0.0.1:$port" \
    >>"$work/smtp-source.log" 2>&1
  S=$((S + 300))
fi
# Postfix delivers and logs asynchronously: wait until the queue is empty and the log quiet.
for _ in $(seq 100); do
  [ -z "$(find "$work/queue/active" "$work/queue/incoming" "$work/queue/deferred" -type f 2>/dev/null)" ] && break
  sleep 0.2
done
sleep 1
lines=$(wc -l <"$work/maillog")
echo "replay-postfix: Postfix $(postconf -dh mail_version) wrote $lines log lines"

"$sim" replay "$work/maillog" --config sim/tests/data/replay-gatekeeper.toml --out "$work/out" | tee "$work/replay.txt"
got=$work/out/replay/replay.json

pass=0 fail=0
check() { # name, jq expression that must be true
  if jq -e "$2" "$got" >/dev/null; then
    pass=$((pass + 1)); echo "ok   $1"
  else
    fail=$((fail + 1)); echo "FAIL $1: $2 in:"; sed 's/^/     /' "$got"
  fi
}
sessions=$((H + B + K + F + D + 2 + S + 1)) # + 1: wait_port's probe connection
taken=$((H + B + F + 2 + S))
check "every logged session replayed ($sessions)" ".sessions == $sessions"
check "every message Postfix took is counted ($taken)" ".mta_messages == $taken"
check "no line of Postfix's is unknown" ".lines_unknown == 0 and .lines == $lines"
check "forged local senders: B1 bans ($F)" ".bans_by_reason.B1 == $F"
check "dictionary attacks and the mistyping client: B4 bans ($((D + 1)))" ".bans_by_reason.B4 == $((D + 1))"
check "nothing else banned (bounces and backscatter: no ban)" ".bans == $((F + D + 1))"
check "Postfix took the forged senders' mail; the gatekeeper refuses it ($F)" ".rejected == $F"
check "honest mail, bounces and the burst delivered, some late ($((H + B + S)))" ".same + .delayed == $((H + B + S))"
check "the mistyping client's two messages never delivered (banned B4)" ".undelivered == 2"
check "... the first flagged for review (Postfix took its sender's next one), and the burst's delayed ones" \
  ".review >= 1 and .review <= 1 + .delayed"
check "the burst from one address met G1" ".dropped_g1 + .rate_delayed >= $((4 - 1))"
check "nothing Postfix refused was let in" ".let_in == 0"
if [ -n "${SAMPLE:-}" ]; then
  # The fixture: the log with the test's paths and the machine's name made neutral.
  sed -e "s#$work#/var/spool/postfix-sample#g" -e "s/ $(hostname) / mx /" "$work/maillog" >"$SAMPLE"
  cp "$got" "${SAMPLE%.log}.replay.json"
  echo "replay-postfix: wrote $SAMPLE ($lines lines)"
fi
echo "replay-postfix: $pass passed, $fail failed"
[ "$fail" = 0 ]
