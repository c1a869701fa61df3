#!/usr/bin/env python3
"""A remote MX for callback verification (C1) tests: answers RCPT as a real MX would.

    python3 ci/mx-fixture.py 127.0.2.25:2525 LOG USER@DOMAIN...

Listens on the address, greets, takes EHLO/HELO, MAIL, RCPT, RSET, NOOP and QUIT, and writes
every command it receives (one line each, after `CONNECT <peer>`) to LOG. RCPT is answered by
the recipient's domain, as the MX of several domains:

- `tempfail.test`: `451 4.3.0` (inconclusive: the gatekeeper tempfails, never bans);
- `policy.test`: `550 5.7.1` to everyone (a policy block of the prober, not a verdict on the
  address: no ban either);
- any other domain: `250 2.1.5` for the USER@DOMAIN arguments, `550 5.1.1 ... User unknown`
  (what Postfix says) for everyone else, so the random address of the gatekeeper's accept-all
  check is refused and a listed user counts as verified.

DATA is refused: a callback never sends a message.
"""
import asyncio
import sys


def rcpt_reply(addr, users):
    domain = addr.rpartition("@")[2]
    if domain == "tempfail.test":
        return "451 4.3.0 <%s>: Temporary lookup failure" % addr
    if domain == "policy.test":
        return "550 5.7.1 Client host rejected: Access denied"
    if addr in users:
        return "250 2.1.5 Ok"
    return "550 5.1.1 <%s>: Recipient address rejected: User unknown in virtual mailbox table" % addr


async def serve(reader, writer, users, log):
    peer = writer.get_extra_info("peername")[0]

    def note(line):
        log.write(line + "\n")
        log.flush()

    def say(line):
        writer.write((line + "\r\n").encode())

    note("CONNECT %s" % peer)
    say("220 mx.fixture.test ESMTP")
    try:
        while True:
            await writer.drain()
            raw = await asyncio.wait_for(reader.readline(), 30)
            if not raw:
                break
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            note(line)
            verb = line[:4].upper()
            if verb == "EHLO":
                say("250-mx.fixture.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
            elif verb == "HELO":
                say("250 mx.fixture.test")
            elif verb == "MAIL":
                say("250 2.1.0 Ok")
            elif verb == "RCPT":
                addr = line.partition(":")[2].strip().split(" ")[0].strip("<>").lower()
                say(rcpt_reply(addr, users))
            elif verb in ("RSET", "NOOP"):
                say("250 2.0.0 Ok")
            elif verb == "QUIT":
                say("221 2.0.0 Bye")
                await writer.drain()
                break
            elif verb == "DATA":
                say("554 5.5.1 Error: no data here")
            else:
                say("502 5.5.2 Error: command not recognized")
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    host, _, port = sys.argv[1].rpartition(":")
    users = {u.lower() for u in sys.argv[3:]}
    log = open(sys.argv[2], "a", buffering=1)
    server = await asyncio.start_server(lambda r, w: serve(r, w, users, log), host, int(port))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
