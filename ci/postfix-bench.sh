#!/usr/bin/env bash
# A private Postfix instance for the load benchmark (ci/bench-peers.sh): Debian's Postfix in
# its own config, queue and data directories, listening on one loopback port, with the
# restrictions equivalent to the gatekeeper's early rejects and a discard transport so nothing
# leaves. The system's Postfix (if any) is not touched.
#
#   bash ci/postfix-bench.sh start DIR PORT   # writes DIR/etc, starts; prints the master's pid
#   bash ci/postfix-bench.sh start DIR PORT CERT KEY   # the same with STARTTLS offered (may)
#   bash ci/postfix-bench.sh stop DIR         # stops it (and leaves DIR for its log)
#
# Equivalence with the gatekeeper (benches/load/gatekeeper.toml):
#   E1  reject_non_fqdn_sender, reject_unlisted_sender (a forged local sender), at MAIL FROM
#       (smtpd_delay_reject = no, as the gatekeeper rejects there too)
#   E2  reject_unlisted_recipient (550 5.1.1), reject_unauth_destination (no relay)
#   handoff: the queue file is fsync'd before the 250 (Postfix's own durability), then the
#       discard transport drops it
#   no per-client limits (anvil rate and count limits 0), no reverse DNS of the client (the
#   gatekeeper does none), no chroot, logging to DIR/maillog through postlogd (the gatekeeper
#   logs every verdict too).
#   STARTTLS (with CERT and KEY, PEM; the gatekeeper's [tls] with the same files):
#       smtpd_tls_security_level = may, smtpd_tls_cert_file / smtpd_tls_key_file, tlsmgr
#       running, no server-side session cache (the client resumes nothing anyway), TLS log
#       level 0 (the handshake is not logged; the session's verdicts still are)
# Postfix has no bans: its forged and fake sessions get the same 5xx and nothing else.
set -euo pipefail
. "$(dirname "$0")/postfix-private.sh"
cmd=${1:?usage: postfix-bench.sh start DIR PORT [CERT KEY] | stop DIR}
dir=$(realpath -m "${2:?missing DIR}")
etc=$dir/etc

case "$cmd" in
start)
  port=${3:?missing PORT}
  cert=${4:-} key=${5:-}
  if [ -n "$cert" ]; then
    [ -r "$cert" ] && [ -r "${key:?missing KEY after CERT}" ] || { echo "postfix-bench: cannot read $cert or $key" >&2; exit 1; }
    tls_main="smtpd_tls_security_level = may
smtpd_tls_cert_file = $(realpath "$cert")
smtpd_tls_key_file = $(realpath "$key")
smtpd_tls_session_cache_database =
smtpd_tls_loglevel = 0"
    tls_master="tlsmgr    unix  - - n 1000? 1 tlsmgr"
  else
    tls_main="smtpd_tls_security_level = none" tls_master=""
  fi
  command -v postfix >/dev/null || { echo "postfix-bench: postfix is not installed" >&2; exit 1; }
  mkdir -p "$etc" "$dir/queue" "$dir/data"
  # The daemons run as postfix: they must reach the directory (mktemp -d makes it 0700).
  chmod 755 "$dir"
  chown postfix "$dir/data"
  # Process limits: room for the benchmark's concurrency without queueing in the backlog.
  cat >"$etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $dir/queue
data_directory = $dir/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
relay_domains =
mynetworks = 192.0.2.1/32
inet_interfaces = loopback-only
inet_protocols = ipv4
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
maillog_file = $dir/maillog
maillog_file_prefixes = $dir
default_process_limit = 1000
virtual_mailbox_domains = example.test
virtual_mailbox_maps = texthash:$etc/users
virtual_transport = discard:benchmark
smtpd_banner = \$myhostname ESMTP Postfix
smtpd_peername_lookup = no
smtpd_delay_reject = no
smtpd_client_restrictions =
smtpd_helo_restrictions =
smtpd_sender_restrictions = reject_non_fqdn_sender, reject_unlisted_sender
smtpd_relay_restrictions = reject_unauth_destination
smtpd_recipient_restrictions = reject_unlisted_recipient
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
smtpd_client_recipient_rate_limit = 0
smtpd_client_new_tls_session_rate_limit = 0
smtpd_client_auth_rate_limit = 0
$tls_main
smtp_tls_security_level = none
EOF
  printf '%s OK\n' alice@example.test bob@example.test postmaster@example.test abuse@example.test >"$etc/users"
  # Every service Postfix needs, none chrooted (ci/postfix-private.sh), plus the delivery
  # agents its defaults name; only the benchmark port listens.
  {
    echo "127.0.0.1:$port inet n - n - - smtpd"
    postfix_daemons
    cat <<EOF
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
local     unix  - n n - - local
lmtp      unix  - - n - - lmtp
$tls_master
EOF
  } >"$etc/master.cf"
  # Postfix writes its complaints to the terminal or syslog: keep them in a file instead.
  if ! script -qec "postfix -c '$etc' check && postfix -c '$etc' start" "$dir/start.log" >/dev/null; then
    echo "postfix-bench: postfix did not start:" >&2
    tr -d '\r' <"$dir/start.log" >&2
    exit 1
  fi
  for _ in $(seq 100); do
    [ -s "$dir/queue/pid/master.pid" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  pid=$(tr -d ' \n' <"$dir/queue/pid/master.pid")
  kill -0 "$pid" || { echo "postfix-bench: master did not start; see $dir/maillog" >&2; exit 1; }
  echo "$pid"
  ;;
stop)
  [ -f "$etc/main.cf" ] && postfix -c "$etc" stop 2>&1 | grep -v "stopping the Postfix mail system" >&2 || true
  ;;
*)
  echo "usage: postfix-bench.sh start DIR PORT [CERT KEY] | stop DIR" >&2
  exit 2
  ;;
esac
