#!/usr/bin/env bash
# Debian's Postfix in front, the gatekeeper beside it as its policy service and as its milter
# (docs/postfix.md): a private Postfix instance on loopback (nothing of the system's Postfix is
# touched), swaks as the SMTP client, the gatekeeper binary as the policy server and the milter,
# callback verification (C1) on, against a real DNS server (dnsmasq, on a loopback port) and a
# remote MX (ci/mx-fixture.py, on 127.0.2.25).
#
# main.cf is Debian's own (what the postfix package's postinst writes: main.cf.debian, its TLS
# lines when the snakeoil key exists, smtpd_relay_restrictions), then this test's site settings
# (paths of the private instance, hostname, virtual mailboxes, loopback), then the gatekeeper's
# two lines: smtpd_recipient_restrictions (the policy service) and smtpd_milters. A check
# verifies that main.cf differs from the site's by exactly those two lines. Five smtpd
# listeners (master.cf):
#   two lines   main.cf as is: policy service and milter (the issue's "Done when")
#   policy      -o smtpd_milters= and smtpd_data_restrictions (docs/postfix.md §2 in full)
#   milter      -o smtpd_recipient_restrictions= : the milter alone, what sendmail gets
#   plain       neither (for BENCH)
#   unix        both over Unix sockets (unix:/path), a second gatekeeper with listen = "unix:..."
#
#   bash ci/postfix-integration.sh            # builds the release binary
#   GATEKEEPER_BIN=target/debug/gatekeeper bash ci/postfix-integration.sh
#   BENCH=5000 bash ci/postfix-integration.sh # then messages/s: Postfix alone, policy, milter, both
#   KEEP=1 ...                                # keep the work directory and its logs
#
# Shows, through Postfix's policy service: a forged local sender refused with the gatekeeper's
# 550 5.7.1 and banned (B1; the client's next message is refused 421 and Postfix disconnects
# it); <> to an unknown user refused 550 5.1.1 and not banned; two unknown recipients banned
# (B4); a Postfix-style probe not banned; a valid message delivered; C1: a sender its MX says
# does not exist (550 5.1.1) refused 550 5.1.7 and banned (B2), as is one at a null-MX domain;
# NXDOMAIN refused 550 5.1.7 without a ban; an MX answering 451 or a policy 550 5.7.1 gives
# 451 4.4.3 and no ban; an existing sender at the probed domain delivered; <> not probed; the
# gatekeeper stopped: Postfix's default action applies (451 4.3.5) and nothing is lost.
# Through the milter alone: the forged local sender refused 550 5.7.1 at MAIL and banned (B1);
# C1 at RCPT as above (550 5.1.7 and B2; 451 4.4.3 and no ban; a real sender delivered; <> not
# probed); EICAR refused at the end of DATA with the gatekeeper's 554 5.7.1 and banned (B3),
# from <> not banned; a clean message delivered; the gatekeeper stopped: milter_default_action
# (Postfix's default, tempfail: 451 4.7.1), and the retry once it is back is delivered.
# Through the two lines: E1, E2 (and B4), C1 (and B2), V1 (and B3), a clean message delivered.
# Through the Unix sockets: mode 0660 and group postfix; the policy service's 550 5.1.1; the
# milter's 550 5.7.1 (B1) and 554 (B3); a clean message delivered; the sockets removed at stop.
# Fails (never skips) when a tool is missing and GATEKEEPER_REQUIRE_TOOLS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
. ci/postfix-private.sh
if ! command -v postfix >/dev/null || ! command -v swaks >/dev/null || ! command -v dnsmasq >/dev/null \
  || ! command -v python3 >/dev/null; then
  # Debian's postfix asks debconf for a mailer type: none, this script writes its own main.cf.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections 2>/dev/null || true
  bash ci/setup.sh postfix swaks dnsmasq-base python3 || true
fi
for tool in postfix swaks dnsmasq python3; do
  if ! command -v $tool >/dev/null; then
    if [ "${GATEKEEPER_REQUIRE_TOOLS:-0}" = 1 ]; then
      echo "postfix-integration: $tool is not installed (bash ci/setup.sh postfix swaks dnsmasq-base python3)" >&2; exit 1
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
two_port=$((smtp_port + 6))
dns_port=$((smtp_port + 7))
mx_port=$((smtp_port + 8))
unix_port=$((smtp_port + 9))
run=$work/run # the Unix sockets of the second gatekeeper
mx_addr=127.0.2.25
etc=$work/etc
gk_pid="" gk2_pid="" dns_pid="" mx_pid=""
cleanup() {
  for pid in $gk_pid $gk2_pid $dns_pid $mx_pid; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  [ -f "$etc/main.cf" ] && postfix -c "$etc" stop >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
wait_port() { # address, port, what
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "postfix-integration: $3 did not start on $1:$2" >&2; return 1
}

# The world C1 probes: a DNS server on loopback with the sender domains' MX records
# (dnsmasq, authoritative for .test only: any other name under .test is NXDOMAIN), and one
# remote MX for all of them (ci/mx-fixture.py: 250 for the users below, 550 5.1.1 for anyone
# else, 451 for tempfail.test, 550 5.7.1 for policy.test). nullmx.test has a null MX (RFC 7505).
dnsmasq --keep-in-foreground --conf-file=/dev/null --port="$dns_port" --listen-address=127.0.0.1 \
  --bind-interfaces --no-resolv --no-hosts --local=/test/ --user=nobody --group=nogroup --pid-file= \
  --log-facility="$work/dnsmasq.log" --log-queries --host-record="mx.fixture.test,$mx_addr" \
  --mx-host=elsewhere.test,mx.fixture.test,10 --mx-host=remote.test,mx.fixture.test,10 \
  --mx-host=tempfail.test,mx.fixture.test,10 --mx-host=policy.test,mx.fixture.test,10 \
  --mx-host=nullmx.test,.,0 2>>"$work/dnsmasq.log" &
dns_pid=$!
python3 ci/mx-fixture.py "$mx_addr:$mx_port" "$work/mx.log" someone@elsewhere.test news@elsewhere.test \
  later@elsewhere.test bench@elsewhere.test carol@elsewhere.test dave@elsewhere.test \
  erin@elsewhere.test frank@elsewhere.test double-bounce@remote.test 2>>"$work/mx-fixture.log" &
mx_pid=$!
wait_port 127.0.0.1 "$dns_port" dnsmasq || { cat "$work/dnsmasq.log" >&2; exit 1; }
wait_port "$mx_addr" "$mx_port" ci/mx-fixture.py || { cat "$work/mx-fixture.log" >&2; exit 1; }

# The gatekeeper: the same users as Postfix, its policy service on $policy_port, its milter on
# $milter_port, and no SMTP front end of its own (server.listen = ""): Postfix keeps port 25.
# C1 on, probing through the DNS server and MX above ([callbacks] port: the MX's port).
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
verify_senders = true
[callbacks]
nameservers = ["127.0.0.1:$dns_port"]
port = $mx_port
allow_private_mx = true              # the remote MX lives on loopback (127.0.2.25)
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

# A second gatekeeper, its own state, listening on Unix sockets as Postfix's smtpd (user
# postfix) reaches them: mode 0660, group postfix (socket_group).
mkdir -p "$run"
sed -e "s|^state_dir = .*|state_dir = \"$work/state-unix\"|" \
  -e "s|^listen = \"127.0.0.1:$policy_port\"|listen = \"unix:$run/policy.sock\"\nsocket_group = \"postfix\"|" \
  -e "s|^listen = \"127.0.0.1:$milter_port\"|listen = \"unix:$run/milter.sock\"\nsocket_group = \"postfix\"|" \
  "$work/gatekeeper.toml" >"$work/gatekeeper-unix.toml"
start_gatekeeper_unix() {
  "$bin" serve --config "$work/gatekeeper-unix.toml" 2>>"$work/gatekeeper-unix.log" &
  gk2_pid=$!
  for _ in $(seq 100); do
    [ -S "$run/policy.sock" ] && [ -S "$run/milter.sock" ] && return 0
    sleep 0.1
  done
  echo "postfix-integration: the gatekeeper on Unix sockets did not start:" >&2; cat "$work/gatekeeper-unix.log" >&2; exit 1
}

# Postfix. master.cf first (postconf edits main.cf beside it): the four listeners; the
# services are those of Debian's master.cf, unchrooted (the private instance has no chroot).
mkdir -p "$etc" "$work/queue" "$work/data" "$work/mail"
chown postfix "$work/data" "$work/mail"
cat >"$etc/master.cf" <<EOF2
127.0.0.1:$two_port inet n - n - - smtpd
127.0.0.1:$smtp_port inet n - n - - smtpd
  -o smtpd_milters=
  -o smtpd_data_restrictions=check_policy_service,inet:127.0.0.1:$policy_port
127.0.0.1:$milter_smtp_port inet n - n - - smtpd
  -o smtpd_recipient_restrictions=
127.0.0.1:$plain_port inet n - n - - smtpd
  -o smtpd_recipient_restrictions=
  -o smtpd_milters=
127.0.0.1:$unix_port inet n - n - - smtpd
  -o smtpd_recipient_restrictions=check_policy_service,unix:$run/policy.sock
  -o smtpd_milters=unix:$run/milter.sock
EOF2
postfix_daemons >>"$etc/master.cf"
# Debian's TLS lines in main.cf (below) need it.
echo "tlsmgr    unix  - - n 1000? 1 tlsmgr" >>"$etc/master.cf"
# 1. Stock Debian: what the postfix package's postinst writes for any mailer type but "No
# configuration".
cp /usr/share/postfix/main.cf.debian "$etc/main.cf"
[ -f /etc/ssl/private/ssl-cert-snakeoil.key ] && cat /usr/share/postfix/main.cf.tls >>"$etc/main.cf"
postconf -c "$etc" -e "smtpd_relay_restrictions=permit_mynetworks permit_sasl_authenticated defer_unauth_destination"
# 2. This test's site, as an admin's would be: the private instance's paths and log, its
# names, virtual mailboxes for example.test (Maildirs under $work/mail), loopback only, and
# no trusted network (the loopback clients stand for the Internet). Nothing for the gatekeeper.
postfix_site "$etc" "$work"
cp "$etc/main.cf" "$work/main.cf.site"
# 3. The gatekeeper: the two lines of docs/postfix.md (milter_default_action is Postfix's
# default, tempfail).
cat >>"$etc/main.cf" <<EOF2
smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:$policy_port
smtpd_milters = inet:127.0.0.1:$milter_port
EOF2
printf '%s %s/\n' alice@example.test alice bob@example.test bob postmaster@example.test postmaster abuse@example.test abuse >"$etc/users"
if ! script -qec "postfix -c '$etc' check && postfix -c '$etc' start" "$work/start.log" >/dev/null; then
  echo "postfix-integration: postfix did not start:" >&2; tr -d '\r' <"$work/start.log" >&2; exit 1
fi
for p in $two_port $smtp_port $milter_smtp_port $plain_port $unix_port; do wait_port 127.0.0.1 "$p" postfix; done
start_gatekeeper
start_gatekeeper_unix

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
sw2() { port=$two_port sw "$@"; }          # through main.cf's two lines: policy service and milter
swu() { port=$unix_port sw "$@"; }         # both lines with unix: sockets, the second gatekeeper
bans_unix() { "$bin" bans --config "$work/gatekeeper-unix.toml" list 2>&1 || true; }
eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
bans() { "$bin" bans --config "$work/gatekeeper.toml" list 2>&1 || true; }
ban_count() { bans | grep -c "${1//./\\.} " || true; }
mx_connections() { grep -c '^CONNECT' "$work/mx.log" || true; }
mx_asked() { # how often the MX was asked MAIL FROM:<> then RCPT TO:<$1> (a callback)
  grep -A1 -E '^MAIL FROM:<>( |$)' "$work/mx.log" | grep -ciF "RCPT TO:<$1>" || true
}

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

# C1 through the policy service: once a valid recipient is given, the gatekeeper asks the
# sender's MX (MAIL FROM:<>, RCPT TO:<sender>). It bans (B2) only on proof that the mailbox
# does not exist: 5.1.1, 5.1.2 or 5.1.10 from the MX, or a null MX (docs/design.md §2, C1).
# NXDOMAIN is refused without a ban; a 4xx or a policy 5xx at the MX is no verdict: 451 4.4.3.
# The policy service answers action=550 5.1.7; Postfix, reporting it as a recipient restriction,
# turns the sender DSN 5.1.7 into the recipient one, 5.1.3 (its smtpd_dsn_fix), and prefixes
# "<rcpt>: Recipient address rejected:". The milter's reply reaches the client unchanged.
fake_sender='<\*\* +550 5\.1\.3 <alice@example\.test>: Recipient address rejected: Sender address rejected: it does not exist at its domain'
out=$(sw 127.0.0.31 --from ghost@elsewhere.test --to alice@example.test --quit-after RCPT)
check "C1: a sender its MX refuses 550 5.1.1: the gatekeeper's 550 (5.1.7, as 5.1.3)" "$fake_sender" "$out"
check "... the MX was asked MAIL FROM:<>, RCPT TO:<ghost@elsewhere.test>" '^[1-9]' "$(mx_asked ghost@elsewhere.test)"
check "... banned (B2)" '127\.0\.0\.31.* B2 ' "$(bans)"
out=$(sw 127.0.0.32 --from carol@elsewhere.test --to alice@example.test --header "Subject: verified" --body "carol verified through postfix")
check "C1: a sender its MX accepts: 250 queued by Postfix" '<- +250 2\.0\.0 Ok: queued as' "$out"
check "... the MX was asked about carol" '^[1-9]' "$(mx_asked carol@elsewhere.test)"
out=$(sw 127.0.0.33 --from anyone@tempfail.test --to alice@example.test --quit-after RCPT)
check "C1: the MX answers 451: 451 4.4.3, the sender retries" '<\*\* +451 4\.4\.3 .*could not be verified' "$out"
check "... not banned" '^0$' "$(ban_count 127.0.0.33)"
out=$(sw 127.0.0.34 --from anyone@policy.test --to alice@example.test --quit-after RCPT)
check "C1: the MX refuses the prober 550 5.7.1 (no proof): 451 4.4.3" '<\*\* +451 4\.4\.3 .*could not be verified' "$out"
check "... not banned" '^0$' "$(ban_count 127.0.0.34)"
out=$(sw 127.0.0.35 --from anyone@gone.test --to alice@example.test --quit-after RCPT)
check "C1: a sender domain that does not exist (NXDOMAIN): 550" "$fake_sender" "$out"
check "... not banned (a broken resolver must never ban)" '^0$' "$(ban_count 127.0.0.35)"
out=$(sw 127.0.0.36 --from anyone@nullmx.test --to alice@example.test --quit-after RCPT)
check "C1: a sender domain with a null MX (RFC 7505): 550" "$fake_sender" "$out"
check "... banned (B2)" '127\.0\.0\.36.* B2 ' "$(bans)"
before=$(mx_connections)
out=$(sw 127.0.0.37 --from '<>' --to alice@example.test --header "Subject: a bounce" --body "a bounce through postfix")
check "C1: <> is not probed: 250 queued by Postfix" '<- +250 2\.0\.0 Ok: queued as' "$out"
check "... and the MX was not asked" "^$before\$" "$(mx_connections)"

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
# C1 through the milter alone, at RCPT.
out=$(swm 127.0.0.51 --from ghost2@elsewhere.test --to alice@example.test --quit-after RCPT)
check "milter: C1, a sender its MX refuses 550 5.1.1: the gatekeeper's 550 5.1.7 at RCPT" '<\*\* +550 5\.1\.7 Sender address rejected: it does not exist at its domain' "$out"
check "... the MX was asked about ghost2" '^[1-9]' "$(mx_asked ghost2@elsewhere.test)"
check "... banned (B2)" '127\.0\.0\.51.* B2 ' "$(bans)"
out=$(swm 127.0.0.52 --from dave@elsewhere.test --to alice@example.test --header "Subject: verified" --body "dave verified through the milter")
check "milter: C1, a sender its MX accepts: 250 queued by Postfix" '<- +250 2\.0\.0 Ok: queued as' "$out"
out=$(swm 127.0.0.53 --from other@tempfail.test --to alice@example.test --quit-after RCPT)
check "milter: C1, the MX answers 451: 451 4.4.3" '<\*\* +451 4\.4\.3 .*could not be verified' "$out"
check "... not banned" '^0$' "$(ban_count 127.0.0.53)"
before=$(mx_connections)
out=$(swm 127.0.0.54 --from '<>' --to alice@example.test --quit-after RCPT)
check "milter: <> is not probed: 250 at RCPT" '<- +250 2\.1\.5' "$out"
check "... and the MX was not asked" "^$before\$" "$(mx_connections)"

# main.cf's own smtpd: Debian's main.cf, the site's settings and the gatekeeper's two lines,
# policy service and milter together: E1, E2, C1 and V1 with their bans.
stock=/usr/share/postfix/main.cf.debian
check "main.cf begins with Debian's main.cf.debian, unchanged" '^same$' \
  "$(cmp -s "$stock" <(head -n "$(wc -l <"$stock")" "$etc/main.cf") && echo same || echo differs)"
check "... and differs from the site's by exactly two lines, the gatekeeper's" \
  '^> smtpd_recipient_restrictions = check_policy_service inet:127\.0\.0\.1:[0-9]+ > smtpd_milters = inet:127\.0\.0\.1:[0-9]+$' \
  "$(diff "$work/main.cf.site" "$etc/main.cf" | grep '^[<>]' | tr '\n' ' ' | sed 's/ $//')"
out=$(sw2 127.0.0.61 --from nobody@example.test --to alice@example.test --quit-after RCPT)
check "two lines: E1, a forged local sender: 550 5.7.1" '<\*\* +550 5\.7\.1 .*Sender is not a user of this domain' "$out"
check "... banned (B1)" '127\.0\.0\.61.* B1 ' "$(bans)"
out=$(sw2 127.0.0.62 --from someone@elsewhere.test --to nobody@example.test,nobody2@example.test --quit-after RCPT)
check "two lines: E2, unknown recipients: 550 5.1.1" '<\*\* +550 5\.1\.1' "$out"
check "... banned (B4)" '127\.0\.0\.62.* B4 ' "$(bans)"
out=$(sw2 127.0.0.63 --from ghost3@elsewhere.test --to alice@example.test --quit-after RCPT)
check "two lines: C1, a sender its MX refuses 550 5.1.1: 550 (5.1.7, as 5.1.3)" "$fake_sender" "$out"
check "... banned (B2)" '127\.0\.0\.63.* B2 ' "$(bans)"
out=$(sw2 127.0.0.64 --from erin@elsewhere.test --to alice@example.test --header "Subject: invoice" --body "$eicar")
check "two lines: V1, EICAR: 554 5.7.1 at the end of DATA" '<\*\* +554 5\.7\.1 .*Eicar-Test-Signature' "$out"
check "... banned (B3)" '127\.0\.0\.64.* B3 ' "$(bans)"
out=$(sw2 127.0.0.65 --from frank@elsewhere.test --to alice@example.test --header "Subject: two lines" --body "frank through the two lines")
check "two lines: a clean message from a verified sender: 250 queued" '<- +250 2\.0\.0 Ok: queued as' "$out"

# The second gatekeeper, on Unix sockets: check_policy_service unix:/path and smtpd_milters =
# unix:/path (as main.cf would say them, here in master.cf for one listener).
check "unix sockets: mode 0660, group postfix" '^660 postfix 660 postfix$' \
  "$(stat -c '%a %G' "$run/policy.sock" "$run/milter.sock" | tr '\n' ' ' | sed 's/ $//')"
out=$(swu 127.0.0.71 --from someone@elsewhere.test --to nobody@example.test --quit-after RCPT)
check "unix: the policy service's 550 5.1.1 for an unknown user" '<\*\* +550 5\.1\.1 .*No such user here' "$out"
out=$(swu 127.0.0.72 --from nobody@example.test --to alice@example.test --quit-after RCPT)
check "unix: the milter's 550 5.7.1 for a forged local sender" '<\*\* +550 5\.7\.1 Sender is not a user of this domain' "$out"
check "... banned (B1) by the second gatekeeper" '127\.0\.0\.72.* B1 ' "$(bans_unix)"
out=$(swu 127.0.0.73 --from erin@elsewhere.test --to alice@example.test --header "Subject: invoice" --body "$eicar")
check "unix: EICAR, the milter's 554 5.7.1" '<\*\* +554 5\.7\.1 .*Eicar-Test-Signature' "$out"
check "... banned (B3)" '127\.0\.0\.73.* B3 ' "$(bans_unix)"
out=$(swu 127.0.0.74 --from frank@elsewhere.test --to alice@example.test --header "Subject: unix" --body "frank through the unix sockets")
check "unix: a clean message: 250 queued" '<- +250 2\.0\.0 Ok: queued as' "$out"
kill "$gk2_pid"; wait "$gk2_pid" 2>/dev/null || true; gk2_pid=""
check "unix: the sockets removed when the gatekeeper stops" '^gone$' \
  "$([ -e "$run/policy.sock" ] || [ -e "$run/milter.sock" ] && echo left || echo gone)"

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

delivered() { # how many of the nine accepted messages are in their Maildirs
  local n=0 f
  for f in "alice:hello through postfix" "bob:sent while the gatekeeper was down" \
    "alice:hello through the milter" "bob:sent while the milter was down" \
    "alice:carol verified through postfix" "alice:a bounce through postfix" \
    "alice:dave verified through the milter" "alice:frank through the two lines" \
    "alice:frank through the unix sockets"; do
    [ -n "$(grep -rl "${f#*:}" "$work/mail/${f%%:*}" 2>/dev/null)" ] && n=$((n + 1))
  done
  echo $n
}
for _ in $(seq 50); do [ "$(delivered)" = 9 ] && break; sleep 0.2; done
check "all nine accepted messages delivered into their Maildirs" '^9$' "$(delivered)"
check "... and no message with EICAR delivered" '^0$' "$(grep -rl 'EICAR-STANDARD' "$work/mail" 2>/dev/null | wc -l)"
check "every callback said MAIL FROM:<> and none sent DATA" '^0 0$' \
  "$(grep '^MAIL' "$work/mx.log" | grep -cvE '^MAIL FROM:<>( |$)' || true) $(grep -ci '^DATA' "$work/mx.log" || true)"

# BENCH=N: N messages through each listener, side by side: Postfix alone, with the policy
# service, with the milter, with both (smtp-source, 10 sessions in parallel, 1 KiB messages, one message
# per connection, from 127.0.0.1 to alice; delivered to her Maildir in the background).
if [ -n "${BENCH:-}" ] && command -v smtp-source >/dev/null; then
  # The sender verified once first: ten first messages at once would find no cached result,
  # and the probes beyond [callbacks] domain_concurrency (2) are not made: 451 4.4.3, which
  # smtp-source takes as fatal. Every timed message then finds the sender cached.
  sw 127.0.0.1 --from bench@elsewhere.test --to alice@example.test --quit-after RCPT >/dev/null
  echo "messages/s through Postfix ($BENCH messages, 10 sessions, 1 KiB each):"
  for run in "Postfix alone:$plain_port" "with the policy service:$smtp_port" "with the milter (V1 scan):$milter_smtp_port" "with both (the two lines):$two_port"; do
    start=$(date +%s.%N)
    smtp-source -s 10 -m "$BENCH" -l 1024 -f bench@elsewhere.test -t alice@example.test "127.0.0.1:${run##*:}"
    end=$(date +%s.%N)
    printf '  %-28s %8.0f\n' "${run%:*}" "$(echo "$BENCH / ($end - $start)" | bc -l)"
  done
fi

echo "postfix-integration: $pass passed, $fail failed"
if [ "$fail" -gt 0 ]; then
  echo "--- gatekeeper log"; tail -40 "$work/gatekeeper.log"; echo "--- postfix log"; tail -40 "$work/maillog"
  echo "--- remote MX (ci/mx-fixture.py)"; tail -40 "$work/mx.log"; echo "--- dnsmasq"; tail -20 "$work/dnsmasq.log"
  exit 1
fi
