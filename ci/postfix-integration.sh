#!/usr/bin/env bash
# Debian's Postfix in front, the gatekeeper beside it as its policy service and as its milter
# (docs/postfix.md): a private Postfix instance on loopback with a main.cf written here (nothing
# of the system's Postfix is touched), swaks as the SMTP client, the gatekeeper binary as the
# policy server and the milter. Three smtpd listeners: one with the policy service (and no
# milter), one with only the milter (smtpd_milters, as a sendmail with INPUT_MAIL_FILTER has),
# one with neither (for BENCH).
#
#   bash ci/postfix-integration.sh            # builds the release binary
#   GATEKEEPER_BIN=target/debug/gatekeeper bash ci/postfix-integration.sh
#   BENCH=5000 bash ci/postfix-integration.sh # then messages/s: Postfix alone, policy, milter
#
# Shows, through Postfix: a forged local sender refused with the gatekeeper's 550 5.7.1 and
# banned (B1; the client's next message is refused 421 and Postfix disconnects it); <> to an
# unknown user refused 550 5.1.1 and not banned; two unknown recipients banned (B4); a valid
# message delivered; the gatekeeper stopped: Postfix's default action applies (451 4.3.5, the
# sender keeps the message) and nothing is lost.
# Through the milter alone: the forged local sender refused 550 5.7.1 at MAIL and banned (B1);
# EICAR refused at the end of DATA with the gatekeeper's 554 5.7.1 and banned (B3), from <> not
# banned; a clean message delivered; the gatekeeper stopped: milter_default_action = tempfail
# (451 4.7.1), and the retry once it is back is delivered.
# Fails (never skips) when postfix or swaks is missing and GATEKEEPER_REQUIRE_TOOLS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v postfix >/dev/null || ! command -v swaks >/dev/null; then
  # Debian's postfix asks debconf for a mailer type: none, this script writes its own main.cf.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  bash ci/setup.sh postfix swaks || true
fi
for tool in postfix swaks; do
  if ! command -v $tool >/dev/null; then
    if [ "${GATEKEEPER_REQUIRE_TOOLS:-0}" = 1 ]; then
      echo "postfix-integration: $tool is not installed (bash ci/setup.sh postfix swaks)" >&2; exit 1
    fi
    echo "postfix-integration: $tool is not installed; skipped (GATEKEEPER_REQUIRE_TOOLS=1 makes this fail)"; exit 0
  fi
done
bin=${GATEKEEPER_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -q -p gatekeeper
  bin=target/release/gatekeeper
fi
bin=$(realpath "$bin")
work=$(mktemp -d)
chmod 755 "$work"
smtp_port=$((20000 + RANDOM % 20000))
policy_port=$((smtp_port + 1))
gk_port=$((smtp_port + 2))
milter_smtp_port=$((smtp_port + 3))
milter_port=$((smtp_port + 4))
plain_port=$((smtp_port + 5))
etc=$work/etc
gk_pid=""
cleanup() {
  [ -n "$gk_pid" ] && kill "$gk_pid" 2>/dev/null && wait "$gk_pid" 2>/dev/null
  [ -f "$etc/main.cf" ] && postfix -c "$etc" stop >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The gatekeeper: the same users as Postfix, its policy service on $policy_port, its milter on
# $milter_port, and no SMTP front end of its own (server.listen = ""): Postfix keeps port 25.
cat >"$work/gatekeeper.toml" <<EOF2
[server]
listen = ""
hostname = "mx.example.test"
state_dir = "$work/state"
[domains]
local = ["example.test"]
users = ["alice@example.test", "bob@example.test"]
[rules]
scan = true
[postfix_policy]
listen = "127.0.0.1:$policy_port"
[milter]
listen = "127.0.0.1:$milter_port"
EOF2
start_gatekeeper() {
  "$bin" serve --config "$work/gatekeeper.toml" 2>>"$work/gatekeeper.log" &
  gk_pid=$!
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$policy_port") 2>/dev/null \
      && (exec 3<>"/dev/tcp/127.0.0.1/$milter_port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "postfix-integration: the gatekeeper did not start:" >&2; cat "$work/gatekeeper.log" >&2; exit 1
}

# Postfix: virtual mailboxes for example.test (Maildirs under $work/mail), the gatekeeper as
# its policy service for RCPT and DATA: the two lines of docs/postfix.md.
mkdir -p "$etc" "$work/queue" "$work/data" "$work/mail"
chown postfix "$work/data" "$work/mail"
cat >"$etc/main.cf" <<EOF2
compatibility_level = 3.6
queue_directory = $work/queue
data_directory = $work/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.example.test
mydomain = example.test
myorigin = \$myhostname
mydestination =
relay_domains =
mynetworks = 192.0.2.1/32
inet_interfaces = loopback-only
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
maillog_file = $work/maillog
maillog_file_prefixes = $work
virtual_mailbox_domains = example.test
virtual_mailbox_maps = texthash:$etc/users
virtual_mailbox_base = $work/mail
virtual_uid_maps = static:$(id -u postfix)
virtual_gid_maps = static:$(id -g postfix)
smtpd_peername_lookup = no
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:$policy_port
smtpd_data_restrictions = check_policy_service inet:127.0.0.1:$policy_port
smtpd_client_connection_rate_limit = 0
smtpd_tls_security_level = none
smtp_tls_security_level = none
milter_default_action = tempfail
EOF2
printf '%s %s/\n' alice@example.test alice bob@example.test bob postmaster@example.test postmaster abuse@example.test abuse >"$etc/users"
cat >"$etc/master.cf" <<EOF2
127.0.0.1:$smtp_port inet n - n - - smtpd
127.0.0.1:$milter_smtp_port inet n - n - - smtpd
  -o smtpd_milters=inet:127.0.0.1:$milter_port
  -o smtpd_recipient_restrictions=
  -o smtpd_data_restrictions=
127.0.0.1:$plain_port inet n - n - - smtpd
  -o smtpd_recipient_restrictions=
  -o smtpd_data_restrictions=
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
EOF2
if ! script -qec "postfix -c '$etc' check && postfix -c '$etc' start" "$work/start.log" >/dev/null; then
  echo "postfix-integration: postfix did not start:" >&2; tr -d '\r' <"$work/start.log" >&2; exit 1
fi
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$smtp_port") 2>/dev/null && break
  sleep 0.1
done
start_gatekeeper

pass=0 fail=0
check() { # name, expected regex, text
  if grep -qE -- "$2" <<<"$3"; then
    pass=$((pass + 1)); echo "ok   $1"
  else
    fail=$((fail + 1)); echo "FAIL $1: expected /$2/ in:"; sed 's/^/     /' <<<"$3"
  fi
}
sw() { # source address, swaks args...
  local src=$1; shift
  swaks --server "127.0.0.1:${port:-$smtp_port}" --local-interface "$src" --helo client.test --timeout ${SWAKS_TIMEOUT:-30} "$@" 2>&1 || true
}
swm() { port=$milter_smtp_port sw "$@"; } # through the milter-only smtpd
eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
bans() { "$bin" bans --config "$work/gatekeeper.toml" list 2>&1 || true; }

if (exec 3<>"/dev/tcp/127.0.0.1/$gk_port") 2>/dev/null; then smtp_open=yes; else smtp_open=no; fi
check "no SMTP listener of its own beside Postfix (server.listen = \"\")" '^no$' "$smtp_open"

out=$(sw 127.0.0.22 --from nobody@example.test --to alice@example.test --quit-after RCPT)
check "forged local sender through Postfix: the gatekeeper's 550 5.7.1" '<\*\* +550 5\.7\.1 .*Sender is not a user of this domain' "$out"
check "... banned (B1)" '127\.0\.0\.22.* B1 ' "$(bans)"
out=$(sw 127.0.0.22 --from someone@elsewhere.test --to alice@example.test --quit-after RCPT)
check "... its next message: 421 4.7.0, Postfix disconnects" '<\*\* +421 4\.7\.0 .*banned' "$out"

out=$(sw 127.0.0.21 --from '<>' --to nobody@example.test --quit-after RCPT)
check "<> to an unknown user: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
check "... and not banned" '^0$' "$(bans | grep -c '127\.0\.0\.21' || true)"

out=$(sw 127.0.0.26 --from someone@elsewhere.test --to nobody@example.test,nobody2@example.test --quit-after RCPT)
check "two unknown recipients with a real sender: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
check "... banned (B4)" '127\.0\.0\.26.* B4 ' "$(bans)"

out=$(sw 127.0.0.29 --from double-bounce@remote.test --to q8x7z3@example.test --quit-after RCPT)
check "a Postfix-style probe of an unknown user: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
out=$(sw 127.0.0.29 --from double-bounce@remote.test --to alice@example.test --quit-after RCPT)
check "... not banned: the next one is accepted" '<- +250 2\.1\.5' "$out"

out=$(sw 127.0.0.27 --from news@elsewhere.test --to alice@example.test --header "Subject: via postfix" --body "hello through postfix")
check "a message to alice: 250 queued by Postfix" '<- +250 2\.0\.0 Ok: queued as' "$out"

# The milter alone (a sendmail with INPUT_MAIL_FILTER, or Postfix without the policy service).
out=$(swm 127.0.0.41 --from nobody@example.test --to alice@example.test --quit-after RCPT)
check "milter: forged local sender, the gatekeeper's 550 5.7.1" '<\*\* +550 5\.7\.1 .*Sender is not a user of this domain' "$out"
check "... banned (B1)" '127\.0\.0\.41.* B1 ' "$(bans)"
out=$(swm 127.0.0.42 --from someone@elsewhere.test --to alice@example.test --header "Subject: invoice" --body "$eicar")
check "milter: EICAR refused at the end of DATA with the gatekeeper's 554 5.7.1" '<\*\* +554 5\.7\.1 .*Eicar-Test-Signature' "$out"
check "... banned (B3)" '127\.0\.0\.42.* B3 ' "$(bans)"
out=$(swm 127.0.0.43 --from '<>' --to alice@example.test --header "Subject: Undelivered Mail Returned to Sender" --body "$eicar")
check "milter: EICAR from <>: 554 5.7.1" '<\*\* +554 5\.7\.1 .*Eicar-Test-Signature' "$out"
check "... and not banned" '^0$' "$(bans | grep -c '127\.0\.0\.43' || true)"
out=$(swm 127.0.0.44 --from news@elsewhere.test --to alice@example.test --header "Subject: via the milter" --body "hello through the milter")
check "milter: a clean message to alice: 250 queued by Postfix" '<- +250 2\.0\.0 Ok: queued as' "$out"

# The gatekeeper stopped: Postfix's default action (smtpd_policy_service_default_action,
# 451 4.3.5) tempfails; the sending MTA keeps the message. Started again: delivered.
kill "$gk_pid"; wait "$gk_pid" 2>/dev/null || true; gk_pid=""
out=$(sw 127.0.0.28 --from later@elsewhere.test --to bob@example.test --header "Subject: retried" --body "sent while the gatekeeper was down")
check "gatekeeper stopped: Postfix's default action, 451 4.3.5" '<\*\* +451 4\.3\.5' "$out"
out=$(swm 127.0.0.45 --from later@elsewhere.test --to bob@example.test --header "Subject: milter retried" --body "sent while the milter was down")
check "gatekeeper stopped: milter_default_action = tempfail, 451 4.7.1" '<\*\* +451 4\.7\.1' "$out"
start_gatekeeper
out=$(swm 127.0.0.45 --from later@elsewhere.test --to bob@example.test --header "Subject: milter retried" --body "sent while the milter was down")
check "... the retry through the milter once it is back: 250 queued" '<- +250 2\.0\.0 Ok: queued as' "$out"
out=$(sw 127.0.0.28 --from later@elsewhere.test --to bob@example.test --header "Subject: retried" --body "sent while the gatekeeper was down")
check "... the retry once it is back: 250 queued" '<- +250 2\.0\.0 Ok: queued as' "$out"

delivered() { # how many of the four accepted messages are in their Maildirs
  local n=0 f
  for f in "alice:hello through postfix" "bob:sent while the gatekeeper was down" \
    "alice:hello through the milter" "bob:sent while the milter was down"; do
    [ -n "$(grep -rl "${f#*:}" "$work/mail/${f%%:*}" 2>/dev/null)" ] && n=$((n + 1))
  done
  echo $n
}
for _ in $(seq 50); do [ "$(delivered)" = 4 ] && break; sleep 0.2; done
check "all four accepted messages delivered into their Maildirs" '^4$' "$(delivered)"
check "... and no message with EICAR delivered" '^0$' "$(grep -rl 'EICAR-STANDARD' "$work/mail" 2>/dev/null | wc -l)"

# BENCH=N: N messages through each listener, side by side: Postfix alone, with the policy
# service, with the milter (smtp-source, 10 sessions in parallel, 1 KiB messages, one message
# per connection, from 127.0.0.1 to alice; delivered to her Maildir in the background).
if [ -n "${BENCH:-}" ] && command -v smtp-source >/dev/null; then
  echo "messages/s through Postfix ($BENCH messages, 10 sessions, 1 KiB each):"
  for run in "Postfix alone:$plain_port" "with the policy service:$smtp_port" "with the milter (V1 scan):$milter_smtp_port"; do
    start=$(date +%s.%N)
    smtp-source -s 10 -m "$BENCH" -l 1024 -f bench@elsewhere.test -t alice@example.test "127.0.0.1:${run##*:}"
    end=$(date +%s.%N)
    printf '  %-28s %8.0f\n' "${run%:*}" "$(echo "$BENCH / ($end - $start)" | bc -l)"
  done
fi

echo "postfix-integration: $pass passed, $fail failed"
if [ "$fail" -gt 0 ]; then
  echo "--- gatekeeper log"; tail -40 "$work/gatekeeper.log"; echo "--- postfix log"; tail -40 "$work/maillog"
  exit 1
fi
