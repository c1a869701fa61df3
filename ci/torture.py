#!/usr/bin/env python3
"""Outside robustness suite for the gatekeeper (issue 12, item 7).

Attacks a running release binary over loopback as an attacker would and checks, for every
case, the replies, that a fresh honest client is still served afterwards, and the server's
memory (/proc/PID/status VmRSS, VmHWM) and descriptors (/proc/PID/fd). The checks are written
to the hardened behaviour issue 12 asks for, so cases may fail on a server that does not have
it yet. Started by ci/torture.sh, which builds the binary, derives the test configuration
(short timeouts) from examples/gatekeeper.toml, starts the server and stops it afterwards.

Every connection comes from its own 127.x.y.z source address (the in-process gate G1 allows
one new connection per address per minute) and only 127.0.0.0/8 is ever targeted. Every socket
has a timeout and every wait is bounded, so a hung server makes cases fail, never the suite
hang.

Output: one `ok NAME` or `FAIL NAME: why` line per case (figures on indented `#` lines), then
exactly `N passed, M failed`; exit status 1 on any failure. `--bench` prints the issue's
benchmark figures instead (10,000 idle connections, 3,000 banned connections, 100 concurrent
20 MiB messages) and asserts nothing.

Python 3.11+ standard library only.
"""

import argparse
import errno
import ipaddress
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
import tomllib

MiB = 1 << 20
REPLY_TIMEOUT = 10.0  # one reply from the server, in seconds
CODE_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)")


class Fail(Exception):
    """A case's check failed; the message says what was expected and what was seen."""


# ---------------------------------------------------------------------------------------------
# The server under test: its process, its limits, its spool.


class Server:
    """The running gatekeeper: /proc figures, configuration values, spool and ban CLI."""

    def __init__(self, args):
        self.pid = args.pid
        self.port = args.port
        self.host = "127.0.0.1"
        self.config_path = args.config
        self.state_dir = args.state_dir
        self.binary = args.binary
        self.log = args.log
        with open(args.config, "rb") as f:
            cfg = tomllib.load(f)
        smtp, server = cfg.get("smtp", {}), cfg.get("server", {})
        self.max_sessions = int(server.get("max_sessions", 2000))
        self.size_max = int(smtp.get("size_max", 26214400))
        self.rcpt_max = int(smtp.get("rcpt_max", 100))
        self.command_timeout = parse_duration(smtp.get("command_timeout", "5m"))
        self.penalty_timeout = parse_duration(smtp.get("penalty_timeout", "30s"))
        self.session_max = parse_duration(smtp.get("session_max", "30m"))
        self.spool = Spool(os.path.join(self.state_dir, "maildir"))

    def status(self, field):
        """A `kB` figure of /proc/PID/status (VmRSS, VmHWM), in KiB; 0 if the process is gone."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def rss(self):
        return self.status("VmRSS")

    def hwm(self):
        return self.status("VmHWM")

    def reset_hwm(self):
        """Resets VmHWM to the current RSS (clear_refs 5, Linux 4.0+); False if not allowed."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def fds(self):
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def alive(self):
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            return state not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def nofile_limit(self):
        try:
            with open(f"/proc/{self.pid}/limits") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        return line.split()[3]
        except OSError:
            pass
        return "?"

    def holds(self, ip, port):
        """True while the server holds a descriptor for the connection from ip:port."""
        local = f"{hex_ip('127.0.0.1')}:{self.port:04X}"
        remote = f"{hex_ip(ip)}:{port:04X}"
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                if p[1] == local and p[2] == remote and p[9] != "0":
                    return True
        return False

    def ban(self, ip):
        cmd = [self.binary, "bans", "--config", self.config_path, "--state-dir", self.state_dir,
               "add", ip, "--reason", "torture"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise Fail(f"`gatekeeper bans add {ip}` failed: {r.stderr.strip() or r.stdout.strip()}")

    def figures(self):
        return f"RSS {self.rss() / 1024:.1f} MiB, fds {self.fds()}"


def hex_ip(ip):
    return socket.inet_aton(ip)[::-1].hex().upper()


def parse_duration(text):
    """Seconds in a humantime duration as the configuration writes them ("10s", "1h 30m")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for n, u in re.findall(r"(\d+)\s*(ms|s|m|h|d)", str(text)):
        total += int(n) * units[u]
    return total


class Spool:
    """The Maildir `new/` directory: finds messages by their `X-Torture-Id:` header."""

    ID = re.compile(rb"X-Torture-Id: (\S+)")

    def __init__(self, root):
        self.new = os.path.join(root, "new")
        self.seen = set()
        self.by_id = {}

    def find(self, tid, wait=3.0):
        """The path of the spooled message with this id, or None."""
        deadline = time.monotonic() + wait
        while True:
            self._scan()
            if tid in self.by_id:
                return self.by_id[tid]
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def read(self, tid):
        path = self.find(tid)
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    def remove(self, tid):
        path = self.by_id.pop(tid, None)
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def _scan(self):
        try:
            names = os.listdir(self.new)
        except OSError:
            return
        for name in names:
            if name in self.seen:
                continue
            self.seen.add(name)
            path = os.path.join(self.new, name)
            try:
                with open(path, "rb") as f:
                    head = f.read(64 * 1024)
            except OSError:
                continue
            m = self.ID.search(head)
            if m:
                self.by_id[m.group(1).decode("ascii", "replace")] = path


def split_message(raw):
    """(header block, body) of a spooled message, split at the first empty line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i], raw[i + len(sep):]
    return raw, b""


# ---------------------------------------------------------------------------------------------
# Source addresses and SMTP clients.


class Addresses:
    """Hands out distinct 127.x.y.z source addresses (never .0 or .255, never 127.0.0.0/16,
    which the scripts' own probes use)."""

    def __init__(self, start="127.1.0.1"):
        self.next_int = int(ipaddress.IPv4Address(start))
        self.lock = threading.Lock()

    def take(self):
        with self.lock:
            while True:
                a = ipaddress.IPv4Address(self.next_int)
                self.next_int += 1
                if a.packed[3] not in (0, 255):
                    if a not in ipaddress.IPv4Network("127.0.0.0/8"):
                        raise RuntimeError("ran out of 127.0.0.0/8 addresses")
                    return str(a)


class Reply:
    def __init__(self, code, lines):
        self.code = code
        self.lines = lines  # bytes, without CRLF

    @property
    def enhanced(self):
        m = re.match(rb"^\d{3}[ -](\d\.\d{1,3}\.\d{1,3})", self.lines[-1])
        return m.group(1).decode() if m else ""

    def __repr__(self):
        return self.lines[-1].decode("ascii", "replace")


class ReplyParser:
    """Splits the server's output into replies and notes any line that is not a well-formed
    reply line (code, separator, printable ASCII, at most 512 octets with CRLF)."""

    def __init__(self):
        self.buf = b""
        self.pending = []
        self.replies = []
        self.malformed = []

    def feed(self, data):
        self.buf += data
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > 4096:
                    self.malformed.append(self.buf[:80])
                    self.buf = b""
                return
            raw, self.buf = self.buf[: i + 1], self.buf[i + 1:]
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            m = CODE_LINE.match(line)
            bad = (not raw.endswith(b"\r\n") or m is None or len(raw) > 512
                   or any(b < 0x20 or b > 0x7E for b in line))
            if bad:
                self.malformed.append(line[:80])
            if m is None:
                continue
            self.pending.append(line)
            if m.group(2) != b"-":
                self.replies.append(Reply(int(m.group(1)), self.pending))
                self.pending = []


class Client:
    """One SMTP connection from a chosen 127.x.y.z source address. Every wait is bounded."""

    def __init__(self, server, src, timeout=REPLY_TIMEOUT, connect=True):
        self.server = server
        self.src = src
        self.timeout = timeout
        self.parser = ReplyParser()
        self.taken = 0  # replies already handed out
        self.eof = False
        self.reset = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.bind((src, 0))
        self.sport = self.sock.getsockname()[1]
        if connect:
            self.sock.connect((server.host, server.port))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def malformed(self):
        return self.parser.malformed

    def _recv(self, timeout):
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            self.eof = self.reset = True
            return True
        if not data:
            self.eof = True
        else:
            self.parser.feed(data)
        return True

    def reply(self, timeout=None):
        """The next reply, or None on EOF or timeout."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.taken >= len(self.parser.replies):
            left = deadline - time.monotonic()
            if self.eof or left <= 0:
                return None
            self._recv(left)
        r = self.parser.replies[self.taken]
        self.taken += 1
        return r

    def send(self, data):
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def cmd(self, line, timeout=None):
        """Sends one command line (CRLF added unless bytes end in LF) and returns its reply."""
        data = line if isinstance(line, bytes) else line.encode()
        if not data.endswith(b"\n"):
            data += b"\r\n"
        try:
            self.send(data)
        except OSError:
            pass  # the reply (or EOF) says what happened
        return self.reply(timeout)

    def expect(self, line, code, what=None):
        r = self.cmd(line) if line is not None else self.reply()
        if r is None or r.code != code:
            label = what or (line if isinstance(line, str) else repr(line)[:60])
            raise Fail(f"{label}: expected {code}, got {describe(r, self)}")
        return r

    def drain(self, timeout=2.0):
        """Reads until EOF (or timeout); True if the server closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._recv(deadline - time.monotonic())
        return self.eof

    def exchange(self, chunks, want=None, timeout=30.0):
        """Writes `chunks` (an iterable of bytes-like objects) while reading replies, so that
        neither side blocks the other, until `want` new replies have arrived (None: until the
        server closes) or `timeout`. Returns the new replies; `self.write_error` says whether
        the server stopped taking input."""
        start = self.taken
        it = iter(chunks)
        cur = memoryview(b"")
        writing = True
        self.write_error = None
        self.sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if want is not None and len(self.parser.replies) - start >= want:
                    break
                if self.eof:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for _, ev in sel.select(min(left, 0.5)):
                    if ev & selectors.EVENT_READ:
                        try:
                            data = self.sock.recv(1 << 20)
                        except BlockingIOError:
                            data = None
                        except ConnectionResetError:
                            self.eof = self.reset = True
                            data = None
                        if data == b"":
                            self.eof = True
                        elif data:
                            self.parser.feed(data)
                    if ev & selectors.EVENT_WRITE and writing:
                        while not cur:
                            nxt = next(it, None)
                            if nxt is None:
                                writing = False
                                sel.modify(self.sock, selectors.EVENT_READ)
                                break
                            cur = memoryview(nxt).cast("B")
                        if writing:
                            try:
                                n = self.sock.send(cur[: 1 << 20])
                                cur = cur[n:]
                            except BlockingIOError:
                                pass
                            except OSError as e:
                                self.write_error = e
                                writing = False
                                sel.modify(self.sock, selectors.EVENT_READ)
        finally:
            sel.close()
            self.sock.setblocking(True)
            self.sock.settimeout(self.timeout)
        new = self.parser.replies[start:]
        self.taken = len(self.parser.replies)
        return new


def describe(r, client=None):
    if r is not None:
        return repr(r)
    if client is not None and client.eof:
        return "connection closed" + (" (reset)" if client.reset else "")
    return "no reply (timeout)"


def codes(replies):
    return [r.code for r in replies]


def summarize(cs):
    """[250, 250, 250, 550] -> '250×3 550'"""
    out = []
    for c in cs:
        if out and out[-1][0] == c:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return " ".join(f"{c}×{n}" if n > 1 else f"{c}" for c, n in out)


def message(tid, body=b"hello\r\n", subject=b"torture"):
    return (b"From: <torture@client.test>\r\nTo: <alice@example.test>\r\nSubject: " + subject
            + b"\r\nX-Torture-Id: " + tid.encode() + b"\r\n\r\n" + body)


class Run:
    """Shared state of one run: the server, the address pool, ids, figures."""

    def __init__(self, server):
        self.server = server
        self.addrs = Addresses()
        self.n = 0
        self.details = []

    def tid(self, what):
        self.n += 1
        return f"{what}-{os.getpid()}-{self.n}"

    def note(self, text):
        self.details.append(text)

    def client(self, timeout=REPLY_TIMEOUT):
        return Client(self.server, self.addrs.take(), timeout)

    def session(self, timeout=REPLY_TIMEOUT, helo="client.test"):
        """A client past the greeting and EHLO."""
        c = self.client(timeout)
        c.expect(None, 220, "greeting")
        c.expect(f"EHLO {helo}", 250)
        return c

    def honest(self, tid=None, check_spool=True):
        """A fresh honest client delivers one message; None if all went well, else why not."""
        tid = tid or self.tid("fresh")
        try:
            with self.session() as c:
                c.expect("MAIL FROM:<>", 250)
                c.expect("RCPT TO:<alice@example.test>", 250)
                c.expect("DATA", 354)
                r = c.expect(message(tid) + b".\r\n", 250, "end of data")
                if b"queued" not in r.lines[-1]:
                    return f"end of data: 250 without a queue id: {r!r}"
                c.expect("QUIT", 221)
                if c.malformed:
                    return f"malformed reply lines {c.malformed[:3]}"
        except Fail as e:
            return str(e)
        except OSError as e:
            return f"connection failed: {e}"
        if check_spool and self.server.spool.find(tid) is None:
            return f"message {tid} not in the spool"
        self.server.spool.remove(tid)
        return None


# ---------------------------------------------------------------------------------------------
# Background samplers and mass connections.


class Sampler(threading.Thread):
    """Samples the server's RSS and descriptor count every `interval` seconds."""

    def __init__(self, server, interval=0.05):
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.max_rss = server.rss()
        self.max_fds = server.fds()
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.max_rss = max(self.max_rss, self.server.rss())
            self.max_fds = max(self.max_fds, self.server.fds())
            self.halt.wait(self.interval)

    def stop(self):
        self.halt.set()
        self.join(5)
        self.max_rss = max(self.max_rss, self.server.rss())
        self.max_fds = max(self.max_fds, self.server.fds())


class Flock:
    """Many raw connections driven by one selector: connects without blocking, records for
    each the first reply line (the greeting), when it arrived and when the server closed."""

    def __init__(self, server, sources):
        self.server = server
        self.sel = selectors.DefaultSelector()
        self.conns = []
        self.open_errors = 0
        for src in sources:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.bind((src, 0))
            except OSError:
                self.open_errors += 1
                s.close()
                continue
            c = {"sock": s, "src": src, "t0": None, "connected": None, "greeting": None,
                 "t_greet": None, "closed": None, "error": None, "buf": b""}
            self.conns.append(c)

    def connect(self, batch=200, timeout=15.0):
        """Starts every connection (in batches, pumping events between them) and waits until
        each is connected or failed, or `timeout`."""
        for i in range(0, len(self.conns), batch):
            for c in self.conns[i:i + batch]:
                c["t0"] = time.monotonic()
                e = c["sock"].connect_ex((self.server.host, self.server.port))
                if e in (0, errno.EINPROGRESS):
                    self.sel.register(c["sock"], selectors.EVENT_WRITE | selectors.EVENT_READ, c)
                else:
                    c["error"] = errno.errorcode.get(e, str(e))
            self.pump(0.01)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(c["connected"] is None and c["error"] is None
                                                  for c in self.conns):
            self.pump(0.2)
        for c in self.conns:
            if c["connected"] is None and c["error"] is None:
                c["error"] = "connect timeout"
                self._drop(c)

    def pump(self, timeout):
        for key, ev in self.sel.select(timeout):
            c = key.data
            s = c["sock"]
            now = time.monotonic()
            if c["connected"] is None:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    c["error"] = errno.errorcode.get(err, str(err))
                    self._drop(c)
                    continue
                c["connected"] = now
                self.sel.modify(s, selectors.EVENT_READ, c)
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    c["closed"] = now
                    self._drop(c)
                    continue
                c["buf"] = (c["buf"] + data)[-1024:]
                if c["greeting"] is None and b"\n" in c["buf"]:
                    c["greeting"] = c["buf"].split(b"\n", 1)[0].rstrip(b"\r")
                    c["t_greet"] = now

    def _drop(self, c):
        try:
            self.sel.unregister(c["sock"])
        except (KeyError, ValueError):
            pass

    def wait(self, cond, timeout):
        """Pumps events until cond() or timeout; returns cond()."""
        deadline = time.monotonic() + timeout
        while not cond() and time.monotonic() < deadline:
            self.pump(0.1)
        return cond()

    def open(self):
        return [c for c in self.conns if c["connected"] is not None and c["closed"] is None]

    def close_all(self):
        for c in self.conns:
            self._drop(c)
            try:
                c["sock"].close()
            except OSError:
                pass
        self.sel.close()


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def settle(run, timeout=10.0):
    """Waits until the server's descriptor count is back near its baseline (earlier cases'
    connections released); returns the count."""
    deadline = time.monotonic() + timeout
    while True:
        n = run.server.fds()
        if n <= run.base_fds + 2 or time.monotonic() >= deadline:
            return n
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# The cases. Each raises Fail (or returns a list of problems); the runner then checks that the
# server lives and serves a fresh client.


def case_honest(run):
    why = run.honest()
    if why:
        raise Fail(why)


def case_pipelining_burst(run):
    tid = run.tid("burst")
    n_noop, n_rset = 500, 200
    burst = [b"EHLO burst.test\r\n", b"NOOP\r\n" * n_noop,
             b"MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n",
             message(tid), b".\r\n", b"RSET\r\nNOOP\r\n" * n_rset, b"QUIT\r\n"]
    expected = [220, 250] + [250] * n_noop + [250, 250, 250, 354, 250] + [250, 250] * n_rset + [221]
    with run.client() as c:
        got = codes(c.exchange([b"".join(burst)], want=len(expected), timeout=30))
        closed = c.drain(3)
        problems = []
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            problems.append(f"{len(got)} replies ({summarize(got)}), expected {len(expected)}; "
                            f"first difference at reply {first}")
        if not closed:
            problems.append("connection not closed after 221")
        if c.malformed:
            problems.append(f"malformed reply lines {c.malformed[:3]}")
    if run.server.spool.find(tid) is None:
        problems.append("pipelined message not in the spool")
    run.server.spool.remove(tid)
    return problems


def case_pipelining_unknown_rcpts(run):
    # Issue 12: a burst with 10 unknown recipients must not be cut off (errors_max 20 target).
    tid = run.tid("unknown")
    burst = (b"EHLO burst.test\r\nMAIL FROM:<>\r\n"
             + b"".join(b"RCPT TO:<nobody%d@example.test>\r\n" % i for i in range(10))
             + b"RCPT TO:<alice@example.test>\r\nDATA\r\n" + message(tid) + b".\r\nQUIT\r\n")
    expected = [220, 250, 250] + [550] * 10 + [250, 354, 250, 221]
    with run.client() as c:
        got = codes(c.exchange([burst], want=len(expected), timeout=20))
        if got != expected:
            return [f"replies {summarize(got)}, expected {summarize(expected)}"
                    + (f" (last: {c.parser.replies[-1]!r})" if c.parser.replies else "")]
    if run.server.spool.find(tid) is None:
        return ["message not in the spool"]
    run.server.spool.remove(tid)
    return []


def case_bare_lf(run):
    tid = run.tid("lf")
    problems = []
    with run.client() as c:
        c.expect(None, 220, "greeting")
        for line, code in [(b"EHLO lf.test\n", 250), (b"MAIL FROM:<>\n", 250),
                           (b"RCPT TO:<alice@example.test>\n", 250), (b"DATA\n", 354)]:
            r = c.cmd(line)
            if r is None or r.code != code:
                raise Fail(f"{line!r}: expected {code} (bare-LF command lines are tolerated), got {describe(r, c)}")
        body = message(tid, b"line one\nline two\n").replace(b"\r\n", b"\n")
        # A bare-LF dot line does not end the data (SMTP smuggling); only CRLF.CRLF does.
        c.send(body + b".\n")
        early = c.reply(1.5)
        if early is not None:
            problems.append(f"LF.LF ended the data: {early!r}")
        else:
            r = c.cmd(b"\r\n.\r\n")
            if r is None or r.code not in (250, 550, 554, 521, 500):
                problems.append(f"end of data: {describe(r, c)}")
            elif r.code == 250:
                raw = run.server.spool.read(tid)
                if raw is None:
                    problems.append("message not in the spool")
                else:
                    _, b = split_message(raw)
                    if b"line one" not in b or b"line two" not in b:
                        problems.append("body lines lost")
                    if re.search(rb"(?<!\r)\n", raw):
                        problems.append("bare LF stored in the spool (not normalized to CRLF)")
            run.note(f"bare-LF message: {r!r}")
        c.cmd("QUIT")
    run.server.spool.remove(tid)
    return problems


def case_bare_cr(run):
    tid = run.tid("cr")
    problems = []
    with run.session() as c:
        # A bare CR inside a command line: any well-formed reply, and the session goes on.
        r = c.cmd(b"NOOP\rNOOP\r\n")
        if r is None:
            raise Fail(f"NOOP<CR>NOOP: {describe(r, c)}")
        run.note(f"NOOP<CR>NOOP: {r!r}")
        extra = c.reply(1.0)
        if extra is not None:
            run.note(f"   and then {extra!r}")
        c.expect("NOOP", 250)
        c.expect("MAIL FROM:<>", 250)
        c.expect("RCPT TO:<alice@example.test>", 250)
        c.expect("DATA", 354)
        r = c.cmd(message(tid, b"left\rright\r\nend\r\r\n") + b".\r\n")
        if r is None:
            raise Fail(f"bare CR in DATA: {describe(r, c)}")
        run.note(f"bare CR in DATA: {r!r}")
        if r.code == 250:
            raw = run.server.spool.read(tid) or b""
            _, body = split_message(raw)
            if re.search(rb"\r(?!\n)", raw):
                problems.append("bare CR stored in the spool (issue 12: bare CR normalised)")
            if b"left" not in body or b"right" not in body:
                problems.append(f"body text lost: {body[:80]!r}")
        elif r.code < 500:
            problems.append(f"bare CR in DATA: {r!r}")
        c.cmd("QUIT")
        if c.malformed:
            problems.append(f"malformed reply lines {c.malformed[:3]}")
    run.server.spool.remove(tid)
    return problems


def case_nul(run):
    problems = []
    tid = run.tid("nul")
    with run.session() as c:
        for line, ok in [(b"NOOP\x00\r\n", (500, 501, 502)),
                         (b"MAIL FROM:<to\x00rture@client.test>\r\n", (501, 553)),
                         (b"MAIL FROM:<>\r\n", (250,)),
                         (b"RCPT TO:<ali\x00ce@example.test>\r\n", (501, 553, 550)),
                         (b"RCPT TO:<alice@example.test>\x00\r\n", (501, 553, 555, 550)),
                         (b"RCPT TO:<alice@example.test>\r\n", (250,)),
                         (b"DATA\r\n", (354,))]:
            r = c.cmd(line)
            if r is None or r.code not in ok:
                problems.append(f"{line!r}: expected {'/'.join(map(str, ok))}, got {describe(r, c)}")
                if r is None:
                    return problems
        r = c.cmd(message(tid, b"nul \x00 in the body\r\n") + b".\r\n")
        if r is None or not (r.code == 250 or 500 <= r.code <= 554):
            problems.append(f"NUL in DATA: {describe(r, c)}")
        run.note(f"NUL in DATA: {describe(r, c)}")
        c.cmd("QUIT")
        if c.malformed:
            problems.append(f"malformed reply lines {c.malformed[:3]}")
    run.server.spool.remove(tid)
    return problems


def case_overlong_line(run):
    problems = []
    with run.session() as c:
        r = c.cmd(b"NOOP " + b"x" * 600)
        if r is None or r.code != 500 or not r.enhanced.startswith("5.5."):
            problems.append(f"600-octet command: expected 500 5.5.x, got {describe(r, c)}")
        c.expect("NOOP", 250, "NOOP after an overlong line")
        r = c.cmd(b"MAIL FROM:<" + b"a" * 520 + b"@client.test>")
        if r is None or r.code != 500:
            problems.append(f"530-octet MAIL: expected 500 5.5.x, got {describe(r, c)}")
        # 8 MiB without a line end: the server must not buffer it.
        run.server.reset_hwm()
        before = run.server.rss()
        chunk = b"y" * MiB
        replies = c.exchange([chunk] * 8 + [b"\r\n"], want=1, timeout=30)
        if not replies or replies[0].code != 500:
            problems.append(f"8 MiB line: expected 500 5.5.x, got {replies[0] if replies else describe(None, c)}")
        growth = run.server.hwm() - before
        run.note(f"8 MiB line: RSS growth {growth} KiB")
        if growth > 4 * 1024:
            problems.append(f"8 MiB line grew RSS by {growth} KiB (> 4 MiB: buffered)")
        if not c.eof:
            c.expect("NOOP", 250, "NOOP after an 8 MiB line")
            c.cmd("QUIT")
    return problems


def case_rcpt_flood(run):
    n = 10_000
    problems = []
    with run.session(timeout=30) as c:
        c.expect("MAIL FROM:<>", 250)
        names = [b"alice", b"bob", b"postmaster"]
        burst = b"".join(b"RCPT TO:<%s@example.test>\r\n" % names[i % 3] for i in range(n))
        run.server.reset_hwm()
        before = run.server.rss()
        replies = c.exchange([burst], want=n, timeout=60)
        got = codes(replies)
        run.note(f"{n} RCPTs: {summarize(got)}; RSS growth {run.server.hwm() - before} KiB")
        ok = got[: run.server.rcpt_max]
        if ok != [250] * run.server.rcpt_max:
            problems.append(f"first {run.server.rcpt_max} RCPTs not all 250: {summarize(ok)}")
        rest = got[run.server.rcpt_max:]
        if rest and rest[-1] == 421:
            if not c.eof and not c.drain(3):
                problems.append("421 but the connection stays open")
            rest = rest[:-1]
        if any(code != 452 for code in rest):
            problems.append(f"beyond rcpt_max: {summarize(rest)} (RFC 5321 §4.5.3.1.10: 452)")
        elif replies and rest and replies[run.server.rcpt_max].enhanced != "4.5.3":
            problems.append(f"beyond rcpt_max: {replies[run.server.rcpt_max]!r} (expected 452 4.5.3)")
        if len(got) < n and not (got and got[-1] == 421):
            problems.append(f"only {len(got)} of {n} RCPTs answered and no 421")
        if len(got) == n and not c.eof:
            tid = run.tid("rcpts")
            r = c.cmd("DATA")
            if r is None or r.code != 354:
                problems.append(f"DATA after the flood: {describe(r, c)}")
            else:
                c.expect(message(tid) + b".\r\n", 250, "end of data after the flood")
                run.server.spool.remove(tid)
            c.cmd("QUIT")
        if c.malformed:
            problems.append(f"malformed reply lines {c.malformed[:3]}")
    return problems


def slowloris(run, data_phase):
    """One byte every 2 s; returns (seconds until the server closed, last reply, problem)."""
    step = 2.0
    with run.client(timeout=5) as c:
        c.expect(None, 220, "greeting")
        if data_phase:
            c.expect("EHLO slow.test", 250)
            c.expect("MAIL FROM:<>", 250)
            c.expect("RCPT TO:<alice@example.test>", 250)
            c.expect("DATA", 354)
            payload = b"Subject: slow\r\n\r\n" + b"slow body line\r\n" * 100
        else:
            payload = b"EHLO slow.test\r\n" + b"NOOP\r\n" * 100
        start = time.monotonic()
        limit = run.server.session_max + 10
        last = None
        for i in range(len(payload)):
            try:
                c.sock.send(payload[i:i + 1])
            except OSError:
                break
            next_byte = time.monotonic() + step
            while not c.eof and time.monotonic() < next_byte:
                r = c.reply(max(next_byte - time.monotonic(), 0.01))
                if r is not None:
                    last = r
            if c.eof or time.monotonic() - start > limit:
                break
        took = time.monotonic() - start
        closed = c.eof or c.drain(1)
        if not closed:
            return took, last, f"still open after {took:.0f} s (session_max {run.server.session_max:.0f} s)"
        return took, last, None


def slow_reader(run):
    """Pipelines NOOPs and never reads the replies: the server's write must time out, the
    connection be released and memory stay bounded."""
    with run.client(timeout=5) as c:
        c.expect(None, 220, "greeting")
        c.sock.setblocking(False)
        data = memoryview(b"NOOP\r\n" * 200_000)
        sent, stalled_since = 0, None
        start = time.monotonic()
        while sent < len(data) and time.monotonic() - start < 20:
            try:
                sent += c.sock.send(data[sent:sent + 65536])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 2:
                    break
                time.sleep(0.05)
            except OSError:
                break
        limit = run.server.command_timeout + 15
        while time.monotonic() - start < limit and run.server.holds(c.src, c.sport):
            time.sleep(0.5)
        took = time.monotonic() - start
        if run.server.holds(c.src, c.sport):
            return took, f"server still holds the connection after {took:.0f} s"
        return took, None


def case_slow_clients(run):
    """Slowloris in the command phase and in DATA, and a client that never reads, at once."""
    results = {}

    def go(name, fn):
        try:
            results[name] = fn()
        except Fail as e:
            results[name] = (0, None, str(e))
        except OSError as e:
            results[name] = (0, None, f"socket error {e}")

    threads = [threading.Thread(target=go, args=("slowloris command", lambda: slowloris(run, False))),
               threading.Thread(target=go, args=("slowloris DATA", lambda: slowloris(run, True))),
               threading.Thread(target=go, args=("slow reader", lambda: slow_reader(run)))]
    run.server.reset_hwm()
    before = run.server.rss()
    for t in threads:
        t.start()
    for t in threads:
        t.join(run.server.session_max + 60)
    problems = []
    for name in ("slowloris command", "slowloris DATA", "slow reader"):
        res = results.get(name)
        if res is None:
            problems.append(f"{name}: did not finish")
            continue
        if name == "slow reader":
            took, why = res if len(res) == 2 else (res[0], res[2])
            run.note(f"{name}: released after {took:.1f} s")
        else:
            took, last, why = res
            run.note(f"{name}: closed after {took:.1f} s, last reply {last!r}")
        if why:
            problems.append(f"{name}: {why}")
    growth = run.server.hwm() - before
    run.note(f"RSS growth {growth} KiB")
    if growth > 8 * 1024:
        problems.append(f"RSS grew by {growth} KiB (> 8 MiB)")
    return problems


def data_lines(total, width=998):
    """At least `total` octets of whole text lines (CRLF each, `width` octets with it), as
    chunks of about 1 MiB that share one buffer."""
    line = b"x" * (width - 2) + b"\r\n"
    chunk = line * (MiB // len(line))
    out, left = [], total
    while left > 0:
        n = min(len(chunk), -(-left // len(line)) * len(line))
        out.append(memoryview(chunk)[:n])
        left -= n
    return out


def case_huge_data(run):
    problems = []
    size = max(200 * MiB, 2 * run.server.size_max)
    with run.session() as c:
        r = c.cmd(f"MAIL FROM:<> SIZE={size}")
        if r is None or r.code != 552:
            problems.append(f"MAIL SIZE={size}: expected 552 5.3.4 (RFC 1870), got {describe(r, c)}")
        elif r.enhanced != "5.3.4":
            problems.append(f"MAIL SIZE={size}: {r!r}, expected 552 5.3.4")
        c.cmd("QUIT")
    # Without a SIZE parameter: the whole message is sent.
    tid = run.tid("huge")
    with run.session(timeout=60) as c:
        c.expect("MAIL FROM:<>", 250)
        c.expect("RCPT TO:<alice@example.test>", 250)
        c.expect("DATA", 354)
        run.server.reset_hwm()
        before = run.server.rss()
        sampler = Sampler(run.server)
        sampler.start()
        t0 = time.monotonic()
        replies = c.exchange([message(tid, b"")] + data_lines(size) + [b".\r\n"], want=1, timeout=120)
        took = time.monotonic() - t0
        sampler.stop()
        peak = max(run.server.hwm(), sampler.max_rss)
        growth = peak - before
        r = replies[0] if replies else None
        run.note(f"{size // MiB} MiB DATA: {describe(r, c)} after {took:.1f} s; RSS growth {growth / 1024:.1f} MiB")
        if r is None or r.code != 552:
            problems.append(f"{size // MiB} MiB DATA: expected 552 5.3.4, got {describe(r, c)}")
        if growth > 16 * 1024:
            problems.append(f"{size // MiB} MiB DATA grew RSS by {growth / 1024:.1f} MiB "
                            "(> 16 MiB: peak RSS must not depend on message size)")
        if run.server.spool.find(tid, wait=0.5) is not None:
            problems.append("the oversized message is in the spool")
            run.server.spool.remove(tid)
        if not c.eof:
            c.cmd("QUIT")
    return problems


def case_dot_stuffing(run):
    tid = run.tid("dots")
    body = b"..\r\n..leading\r\n...\r\n.x\r\nplain\r\n. space\r\n"
    expected = b".\r\n.leading\r\n..\r\nx\r\nplain\r\n space\r\n"
    problems = []
    with run.session() as c:
        c.expect("MAIL FROM:<>", 250)
        c.expect("RCPT TO:<alice@example.test>", 250)
        c.expect("DATA", 354)
        c.expect(message(tid, body) + b".\r\n", 250, "end of data")
        c.expect("QUIT", 221)
    raw = run.server.spool.read(tid)
    if raw is None:
        return ["message not in the spool"]
    _, got = split_message(raw)
    if got != expected:
        problems.append(f"body {got!r}, expected {expected!r}")
    run.server.spool.remove(tid)
    return problems


def case_smuggling(run):
    """A lone dot after or before a bare LF does not end the data; only CRLF.CRLF does, so
    the commands hidden in the message are never executed."""
    tid = run.tid("smuggle")
    hidden = run.tid("hidden")
    body = (b"before\n.\nMAIL FROM:<>\nRCPT TO:<bob@example.test>\nDATA\n" + message(hidden)
            + b"\n.\r\nafter-a\r\n.\nafter-b\r.\r\nafter-c\r\n")
    problems = []
    with run.session() as c:
        c.expect("MAIL FROM:<>", 250)
        c.expect("RCPT TO:<alice@example.test>", 250)
        c.expect("DATA", 354)
        got = c.exchange([message(tid, body) + b".\r\nQUIT\r\n"], want=2, timeout=15)
        cs = codes(got)
        run.note(f"replies {summarize(cs)}")
        if not cs or cs[0] not in (250, 500, 521, 550, 554):
            problems.append(f"end of data: {got[0] if got else describe(None, c)}")
        if cs[1:2] != [221] and not (cs and cs[0] >= 500 and c.eof):
            problems.append(f"more than one end of data: replies {summarize(cs)} (smuggled commands executed)")
    if run.server.spool.find(hidden, wait=0.5) is not None:
        problems.append("the smuggled message was delivered")
        run.server.spool.remove(hidden)
    if cs and cs[0] == 250:
        raw = run.server.spool.read(tid) or b""
        _, b = split_message(raw)
        for needle in (b"before", b"after-a", b"after-b", b"after-c", b"MAIL FROM:<>"):
            if needle not in b:
                problems.append(f"{needle.decode()} missing from the delivered body")
    run.server.spool.remove(tid)
    return problems


def case_early_talker(run):
    tid = run.tid("early")
    with run.client() as c:
        c.send(b"EHLO early.test\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
               + message(tid) + b".\r\nQUIT\r\n")
        got = c.exchange([], want=7, timeout=15)
        cs = codes(got)
        closed = c.eof or c.drain(5)
        run.note(f"replies {summarize(cs)}")
        if c.malformed:
            return [f"malformed reply lines {c.malformed[:3]}"]
        if cs == [220, 250, 250, 250, 354, 250, 221]:
            run.server.spool.remove(tid)
            return []  # served as a pipelining client
        if cs and cs[0] in (421, 521, 554) and all(x >= 400 for x in cs) and closed:
            return []  # refused as a pre-greeting talker
        return [f"replies {summarize(cs)}: neither served in order nor refused and closed"]


def case_bad_sequence(run):
    problems = []

    def want(c, line, ok):
        r = c.cmd(line)
        if r is None or r.code not in ok:
            problems.append(f"{line}: expected {'/'.join(map(str, ok))}, got {describe(r, c)}")

    with run.client() as c:
        c.expect(None, 220, "greeting")
        want(c, "MAIL FROM:<>", (503,))
        want(c, "EHLO seq.test", (250,))
        want(c, "RCPT TO:<alice@example.test>", (503,))
        want(c, "DATA", (503,))
        want(c, "MAIL FROM:<>", (250,))
        # RFC 5321 §3.3 allows 503 or 554 ("no valid recipients") for DATA without RCPT.
        want(c, "DATA", (503, 554))
        want(c, "MAIL FROM:<>", (503,))
        want(c, "RCPT TO:<alice@example.test>", (250,))
        want(c, "RSET", (250,))
        want(c, "RCPT TO:<alice@example.test>", (503,))
        want(c, "QUIT", (221,))
    return problems


def case_bad_paths(run):
    problems = []
    mail = ["MAIL FROM:torture@client.test", "MAIL FROM:<torture>", "MAIL FROM:<tor ture@client.test>",
            "MAIL FROM:<" + "a" * 65 + "@client.test>", "MAIL FROM:<torture@>",
            "MAIL FROM:<torture@-bad-.test>", "MAIL FROM:<torture@client.test"]
    rcpt = ["RCPT TO:alice@example.test", "RCPT TO:<>", "RCPT TO:<alice>", "RCPT TO:<al ice@example.test>",
            "RCPT TO:<alice@example.test", "RCPT TO:<alice@@example.test>", "RCPT TO:<alice@exa_mple..test>"]
    for group, setup in ((mail, []), (rcpt, ["MAIL FROM:<>"])):
        with run.session() as c:
            for line in setup:
                c.expect(line, 250)
            for line in group:
                r = c.cmd(line)
                if r is None or r.code not in (501, 553):
                    problems.append(f"{line}: expected 501/553, got {describe(r, c)}")
                    if r is None:
                        break
            c.cmd("QUIT")
            if c.malformed:
                problems.append(f"malformed reply lines {c.malformed[:3]}")
    return problems


def case_ehlo_argument(run):
    # Issue 12: the EHLO argument is validated, or sanitised before it goes into Received:.
    problems, raw_copies, refused = [], [], []
    for arg in [b"bad\rhost.test", b"bad\thost.test", b"bad\x00host.test", b"bad\x1b[31mhost.test",
                "b\u00e4d.test".encode(), b"bad\xffhost.test", b"bad\x7fhost.test"]:
        tid = run.tid("ehlo")
        with run.client() as c:
            c.expect(None, 220, "greeting")
            r = c.cmd(b"EHLO " + arg + b"\r\n")
            if r is None:
                problems.append(f"EHLO {arg!r}: {describe(r, c)}")
                continue
            if r.code >= 500:
                refused.append(f"{arg!r}: {r.code}")
                c.cmd("QUIT")
                continue  # refused: fine
            if r.code != 250:
                problems.append(f"EHLO {arg!r}: {r!r}")
                continue
            c.expect("MAIL FROM:<>", 250)
            c.expect("RCPT TO:<alice@example.test>", 250)
            c.expect("DATA", 354)
            c.expect(message(tid) + b".\r\n", 250, "end of data")
            c.cmd("QUIT")
            if c.malformed:
                problems.append(f"EHLO {arg!r}: malformed reply lines {c.malformed[:3]}")
        raw = run.server.spool.read(tid)
        run.server.spool.remove(tid)
        if raw is None:
            problems.append(f"EHLO {arg!r}: message not in the spool")
            continue
        head, _ = split_message(raw)
        m = re.search(rb"(?m)^Received:.*(?:\r?\n[ \t].*)*", head)
        if m is None:
            problems.append(f"EHLO {arg!r}: no Received: header")
            continue
        # `.*` stops at LF only, so the match ends with the CR of the header's own CRLF: not
        # part of its content.
        received = m.group(0).removesuffix(b"\r")
        # Folding (CRLF then SP/HT) is the only place for control characters in a header.
        unfolded = re.sub(rb"\r\n[ \t]", b" ", received)
        if any(b < 0x20 or b > 0x7E for b in unfolded):
            raw_copies.append((arg, unfolded))
    run.note(f"refused: {', '.join(refused) or 'none'}")
    if raw_copies:
        problems.append(f"{len(raw_copies)} EHLO arguments accepted (250) and copied raw into Received: "
                        f"({', '.join(repr(a) for a, _ in raw_copies)}), e.g. {raw_copies[0][1][:48]!r}")
    return problems


def case_long_data_line(run):
    # Issue 12: lines over 1,000 octets are accepted and folded, not refused with 500.
    tid = run.tid("long")
    lines = [b"<html>" + b"0123456789" * 150 + b"</html>", b"A" * 20_000]
    problems = []
    with run.session() as c:
        c.expect("MAIL FROM:<>", 250)
        c.expect("RCPT TO:<alice@example.test>", 250)
        c.expect("DATA", 354)
        r = c.cmd(message(tid, b"\r\n".join(lines) + b"\r\nend\r\n") + b".\r\n")
        if r is None or r.code != 250:
            problems.append(f"lines of 1,512 and 20,000 octets: expected 250, got {describe(r, c)}")
        c.cmd("QUIT")
    if problems:
        return problems
    raw = run.server.spool.read(tid) or b""
    run.server.spool.remove(tid)
    _, body = split_message(raw)
    longest = max((len(x) for x in body.split(b"\r\n")), default=0)
    if longest > 998:
        problems.append(f"stored with a line of {longest} octets (not folded to <= 998)")
    compact = re.sub(rb"[\r\n \t]", b"", body)
    for line in lines:
        if line not in compact:
            problems.append(f"content of the {len(line)}-octet line not preserved")
    return problems


def idle_connections(run, n):
    """Opens n idle connections from n addresses; returns (flock, figures) after greeting."""
    base_rss, base_fds = run.server.rss(), run.server.fds()
    flock = Flock(run.server, [run.addrs.take() for _ in range(n)])
    t0 = time.monotonic()
    flock.connect()
    flock.wait(lambda: all(c["greeting"] is not None or c["closed"] is not None or c["error"] is not None
                           for c in flock.conns), 30)
    took = time.monotonic() - t0
    time.sleep(0.5)
    flock.pump(0.01)
    rss, fds = run.server.rss(), run.server.fds()
    fig = {"n": n, "took": took, "base_rss": base_rss, "base_fds": base_fds, "rss": rss, "fds": fds,
           "kib_each": (rss - base_rss) / max(n, 1),
           "greeted_220": sum(1 for c in flock.conns if (c["greeting"] or b"").startswith(b"220")),
           "errors": sum(1 for c in flock.conns if c["error"]) + flock.open_errors}
    return flock, fig


def case_idle_connections(run):
    n = min(2000, int(run.server.max_sessions * 0.8))
    problems = []
    flock, fig = idle_connections(run, n)
    run.note(f"{n} idle connections ({fig['errors']} failed to connect) open in {fig['took']:.1f} s: "
             f"RSS {fig['base_rss'] / 1024:.1f} -> {fig['rss'] / 1024:.1f} MiB ({fig['kib_each']:.1f} KiB each), "
             f"fds {fig['base_fds']} -> {fig['fds']}")
    try:
        if fig["greeted_220"] != n:
            others = [c["greeting"] or c["error"] for c in flock.conns if not (c["greeting"] or b"").startswith(b"220")]
            problems.append(f"{fig['greeted_220']} of {n} greeted 220; others: {others[:3]}")
        if fig["fds"] - fig["base_fds"] > n + 32:
            problems.append(f"{fig['fds'] - fig['base_fds']} descriptors for {n} connections")
        if fig["kib_each"] > 8:
            problems.append(f"{fig['kib_each']:.1f} KiB of RSS per idle connection (> 8 KiB, issue 12's goal)")
        why = run.honest()
        if why:
            problems.append(f"fresh client while {n} idle connections are open: {why}")
        # The server's command timeout must end them all.
        limit = run.server.command_timeout + 10
        flock.wait(lambda: not flock.open(), limit)
        still = len(flock.open())
        timed_out = sum(1 for c in flock.conns if b"421" in c["buf"])
        run.note(f"after command_timeout ({run.server.command_timeout:.0f} s): {still} still open, "
                 f"{timed_out} got 421; server fds {run.server.fds()}")
        if still:
            problems.append(f"{still} idle connections still open {limit:.0f} s after the greeting")
    finally:
        flock.close_all()
    return problems


def ban_and_wait(run, ip):
    run.server.ban(ip)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with Client(run.server, ip, timeout=5) as c:
                r = c.reply()
                if r is not None and r.code == 554:
                    c.cmd("QUIT")
                    return
                c.cmd("QUIT")
        except OSError:
            pass
        time.sleep(0.5)
    raise Fail(f"{ip} not refused with 554 within 10 s of `bans add`")


def banned_flood(run, n, close_within, wait_after):
    ip = run.addrs.take()
    ban_and_wait(run, ip)
    settle(run, 5)
    base_rss, base_fds = run.server.rss(), run.server.fds()
    run.server.reset_hwm()
    sampler = Sampler(run.server)
    sampler.start()
    flock = Flock(run.server, [ip] * n)
    t0 = time.monotonic()
    flock.connect(batch=250, timeout=15)
    during = run.honest()
    flock.wait(lambda: not flock.open(), wait_after)
    sampler.stop()
    fig = {"ip": ip, "n": n, "base_rss": base_rss, "base_fds": base_fds, "max_fds": sampler.max_fds,
           "max_rss": max(sampler.max_rss, run.server.hwm()), "fresh_during": during,
           "connected": sum(1 for c in flock.conns if c["connected"] is not None),
           "refused": sum(1 for c in flock.conns if c["error"]),
           "greetings": {}, "still_open": len(flock.open()), "took": time.monotonic() - t0}
    holds = []
    for c in flock.conns:
        g = (c["greeting"] or b"(none)")[:3].decode("ascii", "replace")
        fig["greetings"][g] = fig["greetings"].get(g, 0) + 1
        if c["connected"] is not None:
            end = c["closed"] if c["closed"] is not None else time.monotonic()
            holds.append(end - (c["t_greet"] or c["connected"]))
    holds.sort()
    fig["hold_max"] = holds[-1] if holds else 0
    fig["hold_p50"] = holds[len(holds) // 2] if holds else 0
    fig["late"] = sum(1 for h in holds if h > close_within)
    flock.close_all()
    return fig


def case_banned_flood(run):
    n = 3000
    close_within = 5.0
    problems = []
    fig = banned_flood(run, n, close_within, wait_after=close_within + 5)
    cap = run.server.max_sessions
    run.note(f"{n} connections from banned {fig['ip']}: {fig['connected']} connected, {fig['refused']} refused; "
             f"greetings {fig['greetings']}; server fds {fig['base_fds']} -> max {fig['max_fds']} "
             f"(max_sessions {cap}); RSS {fig['base_rss'] / 1024:.1f} -> {fig['max_rss'] / 1024:.1f} MiB; "
             f"held p50 {fig['hold_p50']:.1f} s, max {fig['hold_max']:.1f} s; "
             f"{fig['still_open']} still open after {fig['took']:.0f} s")
    if fig["greetings"].get("220"):
        problems.append(f"{fig['greetings']['220']} banned connections greeted 220")
    if fig["max_fds"] > cap + fig["base_fds"] + 16:
        problems.append(f"server held {fig['max_fds']} descriptors (max_sessions {cap}): "
                        "refused connections count against no limit")
    if fig["late"]:
        problems.append(f"{fig['late']} refused connections held longer than {close_within:.0f} s "
                        f"(max {fig['hold_max']:.1f} s; penalty_timeout {run.server.penalty_timeout:.0f} s)")
    if fig["fresh_during"]:
        problems.append(f"fresh client during the flood: {fig['fresh_during']}")
    return problems


def large_messages(run, count, size, timeout):
    """`count` clients send a `size`-octet message each at once; returns figures."""
    results = [None] * count
    ids = [run.tid("large") for _ in range(count)]
    srcs = [run.addrs.take() for _ in range(count)]
    body = data_lines(size)

    def send(i):
        try:
            with Client(run.server, srcs[i], timeout=timeout) as c:
                c.expect(None, 220, "greeting")
                c.expect("EHLO large.test", 250)
                c.expect(f"MAIL FROM:<> SIZE={size + 1024}", 250)
                c.expect("RCPT TO:<alice@example.test>", 250)
                c.expect("DATA", 354)
                got = c.exchange([message(ids[i], b"")] + body + [b".\r\n"], want=1, timeout=timeout)
                results[i] = got[0] if got else describe(None, c)
                c.cmd("QUIT")
        except (Fail, OSError) as e:
            results[i] = str(e)

    settle(run, 5)
    run.server.reset_hwm()
    before = run.server.rss()
    sampler = Sampler(run.server, 0.1)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    took = time.monotonic() - t0
    sampler.stop()
    peak = max(sampler.max_rss, run.server.hwm())
    accepted = [i for i, r in enumerate(results) if isinstance(r, Reply) and r.code == 250]
    budget = [i for i, r in enumerate(results) if isinstance(r, Reply) and r.code == 452 and r.enhanced == "4.3.1"]
    other = [results[i] for i in range(count) if i not in accepted and i not in budget]
    stored = 0
    for i in accepted:
        path = run.server.spool.find(ids[i], wait=1)
        if path and os.path.getsize(path) >= size:
            stored += 1
        run.server.spool.remove(ids[i])
    return {"count": count, "size": size, "before": before, "peak": peak, "growth": peak - before,
            "took": took, "accepted": len(accepted), "budget": len(budget), "other": other, "stored": stored}


def case_concurrent_large(run):
    count, size = 20, min(20 * MiB, run.server.size_max - 64 * 1024)
    fig = large_messages(run, count, size, timeout=max(60, run.server.session_max))
    run.note(f"{count} x {size // MiB} MiB at once in {fig['took']:.1f} s: {fig['accepted']} accepted, "
             f"{fig['budget']} 452 4.3.1; RSS {fig['before'] / 1024:.1f} -> peak {fig['peak'] / 1024:.1f} MiB "
             f"(growth {fig['growth'] / 1024:.1f} MiB)")
    problems = []
    if fig["other"]:
        problems.append(f"{len(fig['other'])} messages neither 250 nor 452 4.3.1: {fig['other'][:2]}")
    if not fig["accepted"]:
        problems.append("no message accepted")
    if fig["stored"] != fig["accepted"]:
        problems.append(f"{fig['accepted'] - fig['stored']} accepted messages missing or short in the spool")
    if fig["growth"] > 64 * 1024:
        problems.append(f"RSS grew by {fig['growth'] / 1024:.0f} MiB (> 64 MiB: messages held in memory)")
    return problems


def case_log_clean(run):
    if not run.server.log:
        return []
    try:
        with open(run.server.log, "rb") as f:
            text = f.read()
    except OSError as e:
        return [f"cannot read the server log: {e}"]
    bad = [line for line in text.splitlines() if b"panicked" in line or b"ERROR" in line]
    return [f"{len(bad)} panics/errors in the log, first: {bad[0][:160]!r}"] if bad else []


CASES = [
    ("honest-client", case_honest),
    ("pipelining-burst", case_pipelining_burst),
    ("pipelining-10-unknown-rcpts", case_pipelining_unknown_rcpts),
    ("bare-lf", case_bare_lf),
    ("bare-cr", case_bare_cr),
    ("nul-bytes", case_nul),
    ("overlong-command-line", case_overlong_line),
    ("rcpt-flood-10000", case_rcpt_flood),
    ("dot-stuffing", case_dot_stuffing),
    ("smuggling-lone-dot", case_smuggling),
    ("early-talker", case_early_talker),
    ("bad-sequence", case_bad_sequence),
    ("bad-paths", case_bad_paths),
    ("ehlo-argument", case_ehlo_argument),
    ("long-data-line", case_long_data_line),
    ("slow-clients", case_slow_clients),
    ("data-200mib", case_huge_data),
    ("idle-connections", case_idle_connections),
    ("banned-flood", case_banned_flood),
    ("concurrent-large-messages", case_concurrent_large),
    ("server-log-clean", case_log_clean),
]


def run_suite(run, only):
    passed = failed = 0
    run.base_fds = run.server.fds()
    print(f"# server pid {run.server.pid} on {run.server.host}:{run.server.port}, "
          f"RLIMIT_NOFILE {run.server.nofile_limit()}; {run.server.figures()}", flush=True)
    for name, fn in CASES:
        if only and not any(o in name for o in only):
            continue
        run.details = []
        t0 = time.monotonic()
        problems = []
        if not run.server.alive():
            problems = ["server is not running"]
        else:
            settle(run)
            try:
                problems = list(fn(run) or [])
            except Fail as e:
                problems = [str(e)]
            except OSError as e:
                problems = [f"socket error: {e!r}"]
            if not run.server.alive():
                problems.append("the server died")
            elif name != "server-log-clean":
                why = run.honest()
                if why:
                    problems.append(f"fresh client afterwards: {why}")
        took = time.monotonic() - t0
        if problems:
            failed += 1
            print(f"FAIL {name}: " + "; ".join(problems), flush=True)
        else:
            passed += 1
            print(f"ok {name}", flush=True)
        for d in run.details:
            print(f"   # {d}", flush=True)
        print(f"   # {took:.1f} s; {run.server.figures()}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return failed == 0


def run_bench(run):
    """The issue's benchmark figures; nothing is asserted."""
    run.base_fds = run.server.fds()
    print(f"# bench: server pid {run.server.pid}, max_sessions {run.server.max_sessions}, "
          f"RLIMIT_NOFILE {run.server.nofile_limit()}; {run.server.figures()}", flush=True)
    # The banned flood first: RSS freed by the idle case would stay with the allocator and
    # hide the flood's own growth.
    fig = banned_flood(run, 3000, 5.0, wait_after=run.server.penalty_timeout + 5)
    print(f"banned flood: 3000 connections from {fig['ip']}: greetings {fig['greetings']}, "
          f"{fig['refused']} refused at connect; RSS {fig['base_rss'] / 1024:.1f} -> {fig['max_rss'] / 1024:.1f} MiB "
          f"({(fig['max_rss'] - fig['base_rss']) / 3000:.1f} KiB each); descriptors {fig['base_fds']} -> "
          f"max {fig['max_fds']}; held p50 {fig['hold_p50']:.1f} s, max {fig['hold_max']:.1f} s", flush=True)
    settle(run, 15)
    n = min(10_000, run.server.max_sessions - 100)
    flock, fig = idle_connections(run, n)
    print(f"idle connections: {n} ({fig['greeted_220']} greeted 220, {fig['errors']} failed) in {fig['took']:.1f} s; "
          f"RSS {fig['base_rss'] / 1024:.1f} -> {fig['rss'] / 1024:.1f} MiB = {fig['kib_each']:.1f} KiB each "
          f"(goal <= 8); fds {fig['base_fds']} -> {fig['fds']}", flush=True)
    flock.close_all()
    settle(run, 15)
    fig = large_messages(run, 100, min(20 * MiB, run.server.size_max - 64 * 1024), timeout=600)
    print(f"large messages: 100 x 20 MiB at once in {fig['took']:.1f} s: {fig['accepted']} accepted, "
          f"{fig['budget']} 452 4.3.1, {len(fig['other'])} other; RSS {fig['before'] / 1024:.1f} -> peak "
          f"{fig['peak'] / 1024:.1f} MiB: growth {fig['growth'] / 1024:.1f} MiB (goal <= 64)", flush=True)
    if fig["other"]:
        print(f"   # other outcomes: {fig['other'][:3]}")
    return True


def wait_listening(port, timeout=30):
    """Waits until something listens on 127.0.0.1:port, without connecting to it."""
    want = f"{hex_ip('127.0.0.1')}:{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            if any(p[1] == want and p[3] == "0A" for p in (line.split() for line in f)):
                return True
        time.sleep(0.1)
    return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True, help="the server's process id")
    p.add_argument("--config", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--binary", required=True, help="the gatekeeper binary (for `bans add`)")
    p.add_argument("--log", help="the server's log file, checked for panics")
    p.add_argument("--bench", action="store_true", help="print the benchmark figures instead")
    p.add_argument("only", nargs="*", help="run only cases whose name contains one of these")
    args = p.parse_args()
    limit = raise_nofile()
    if limit < 8000:
        print(f"# warning: RLIMIT_NOFILE is only {limit}", flush=True)
    server = Server(args)
    if not wait_listening(args.port):
        print(f"FAIL startup: nothing listens on 127.0.0.1:{args.port}")
        print("0 passed, 1 failed")
        return 1
    run = Run(server)
    ok = run_bench(run) if args.bench else run_suite(run, args.only)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
