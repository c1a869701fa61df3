/* LD_PRELOAD shim for the load benchmark (ci/bench-peers.sh): binds every IPv4 TCP socket
 * that connects to 127.0.0.0/8 to its own source address first, so a client that cannot
 * choose its source address (Postfix's smtp-source) looks like many clients, as loadgen's
 * sessions do and as the gate (G1: one connection per address per minute) needs.
 *
 * Addresses are loadgen's (benches/src/sources.rs): index 0 is 127.1.0.1, .0 and .255 are
 * skipped. SRCADDR_STATE names loadgen's --sources file: the first index is read from it and
 * the next free one written back at exit, so the two clients never reuse an address.
 *
 * Build: gcc -O2 -shared -fPIC -o srcaddr.so ci/postfix-srcaddr.c -ldl
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>

#define PER_24 254UL
#define CAPACITY (PER_24 * 255UL * 256UL)

static atomic_ulong next_index;
static int (*real_connect)(int, const struct sockaddr *, socklen_t);

__attribute__((constructor)) static void srcaddr_init(void) {
  real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
  const char *state = getenv("SRCADDR_STATE");
  FILE *f = state ? fopen(state, "r") : NULL;
  unsigned long start = 0;
  if (f) {
    if (fscanf(f, "%lu", &start) != 1) start = 0;
    fclose(f);
  }
  atomic_store(&next_index, start % CAPACITY);
}

__attribute__((destructor)) static void srcaddr_fini(void) {
  const char *state = getenv("SRCADDR_STATE");
  FILE *f = state ? fopen(state, "w") : NULL;
  if (f) {
    fprintf(f, "%lu\n", atomic_load(&next_index) % CAPACITY);
    fclose(f);
  }
}

static in_addr_t source_addr(unsigned long index) {
  unsigned long i = index % CAPACITY, block = i / PER_24, host = i % PER_24 + 1;
  return htonl((127UL << 24) | ((1 + block / 256) << 16) | ((block % 256) << 8) | host);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
  if (addr && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
    const struct sockaddr_in *to = (const struct sockaddr_in *)addr;
    int type = 0;
    socklen_t type_len = sizeof type;
    if ((ntohl(to->sin_addr.s_addr) >> 24) == 127 && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_len) == 0 &&
        type == SOCK_STREAM) {
      struct sockaddr_in from = {.sin_family = AF_INET, .sin_port = 0};
      for (int tries = 0; tries < 4; tries++) {
        from.sin_addr.s_addr = source_addr(atomic_fetch_add(&next_index, 1));
        if (bind(fd, (const struct sockaddr *)&from, sizeof from) == 0) break;
        if (errno != EADDRINUSE && errno != EADDRNOTAVAIL) break;
      }
    }
  }
  return real_connect(fd, addr, len);
}
