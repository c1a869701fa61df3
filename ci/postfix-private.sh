# Sourced by the scripts that run a private Postfix instance on loopback
# (ci/postfix-integration.sh, ci/replay-postfix.sh; ci/postfix-bench.sh its services): what
# their master.cf and main.cf share.

# postfix_daemons: the services of Debian's master.cf that a private instance needs, none
# chrooted (it has no chroot), its log through postlogd. Append after the smtpd listeners.
postfix_daemons() {
  cat <<'EOF2'
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
}

# postfix_site ETC WORK: the site's main.cf settings, as an admin's would be: the private
# instance's paths and log (WORK/maillog), its names, virtual mailboxes for example.test
# (ETC/users, Maildirs under WORK/mail), loopback only, and no trusted network (the loopback
# clients stand for the Internet). Nothing for the gatekeeper.
postfix_site() {
  local etc=$1 work=$2
  postconf -c "$etc" -e "queue_directory=$work/queue" "data_directory=$work/data" \
    "maillog_file=$work/maillog" "maillog_file_prefixes=$work" \
    myhostname=mx.example.test mydomain=example.test 'myorigin=$myhostname' mydestination= \
    relay_domains= mynetworks=192.0.2.1/32 inet_interfaces=loopback-only inet_protocols=ipv4 \
    alias_maps= alias_database= smtputf8_enable=no smtpd_peername_lookup=no \
    virtual_mailbox_domains=example.test "virtual_mailbox_maps=texthash:$etc/users" \
    "virtual_mailbox_base=$work/mail" "virtual_uid_maps=static:$(id -u postfix)" \
    "virtual_gid_maps=static:$(id -g postfix)"
}
