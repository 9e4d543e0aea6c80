/* floor-bench: the least any client can do per command, for `npm run bench -- --floor`.
 *
 * No library and no checks beyond what keeps the stream in step: a fixed-newstyle
 * handshake ending in NBD_OPT_GO (no structured replies, so every reply is the 16-byte
 * simple one), then one command at a time over a Unix socket.  Each command is one send;
 * its reply is read with non-blocking recv calls (header, then data) into one reused
 * buffer, waiting in poll() only when the socket is empty.  That is one send and two
 * recv per command, plus a poll and one more recv when the reply has not come yet: a
 * client can hardly wait on a round trip for less.  The depth-1 rows of
 * bench/run.js compare nbd-client and libnbd to it, so a table shows how much of the
 * time per command is the client's and how much is the machine's (the server and the
 * wake-ups between the two processes).
 *
 * Usage and output are libnbd-bench's (see bench/libnbd-bench.c), for depth 1 only and
 * without TLS:
 *
 *   floor-bench --socket PATH --op pread|pwrite --bs BYTES --depth 1
 *               --ops N [--size BYTES] [--warmup N]
 *
 * prints {"ops":N,"seconds":s,"opsPerSec":x,"mibPerSec":y,"cpuUserUs":u,
 * "cpuSystemUs":k,"cpuUsPerOp":c}.  --size is required to stay within the export (the
 * export size is read from NBD_OPT_GO's reply and checked).  Any failure prints a
 * message on stderr and exits 1.
 *
 * Build: cc -O2 -o bench/build/floor-bench bench/floor.c
 */

#define _GNU_SOURCE
#include <endian.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include "bench-util.h"

#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define OPTION_REPLY_MAGIC 0x0003e889045565a9ull
#define OPT_GO 7u
#define REP_ACK 1u
#define REP_INFO 3u
#define INFO_EXPORT 0u
#define CMD_READ 0u
#define CMD_WRITE 1u
#define CMD_DISC 2u
#define FLAG_FIXED_NEWSTYLE 1u
#define FLAG_NO_ZEROES 2u

static int fd = -1;

/* Reads exactly n bytes, waiting in poll() whenever the socket is empty. */
static void
read_exact (void *buf, size_t n)
{
  size_t got = 0;
  while (got < n) {
    ssize_t r = recv (fd, (char *) buf + got, n - got, MSG_DONTWAIT);
    if (r > 0) {
      got += r;
      continue;
    }
    if (r == 0)
      die ("the server closed the connection");
    if (errno == EINTR)
      continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
      die ("recv: %s", strerror (errno));
    struct pollfd p = { .fd = fd, .events = POLLIN };
    if (poll (&p, 1, -1) == -1 && errno != EINTR)
      die ("poll: %s", strerror (errno));
  }
}

/* Writes all of iov (blocking socket for the handshake, short writes retried). */
static void
write_all (struct iovec *iov, int n)
{
  while (n > 0) {
    ssize_t w = writev (fd, iov, n);
    if (w == -1) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        struct pollfd p = { .fd = fd, .events = POLLOUT };
        poll (&p, 1, -1);
        continue;
      }
      die ("send: %s", strerror (errno));
    }
    while (n > 0 && (size_t) w >= iov->iov_len) {
      w -= iov->iov_len;
      iov++;
      n--;
    }
    if (n > 0) {
      iov->iov_base = (char *) iov->iov_base + w;
      iov->iov_len -= w;
    }
  }
}

/* Handshake: fixed newstyle, NBD_OPT_GO on the default export.  Returns its size. */
static uint64_t
handshake (void)
{
  unsigned char greeting[18];
  read_exact (greeting, sizeof greeting);
  if (memcmp (greeting, "NBDMAGICIHAVEOPT", 16) != 0)
    die ("the server does not speak newstyle NBD");
  uint16_t server_flags = (greeting[16] << 8) | greeting[17];
  if (!(server_flags & FLAG_FIXED_NEWSTYLE))
    die ("the server does not offer fixed newstyle");
  uint32_t client_flags = htobe32 (server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));

  /* NBD_OPT_GO with an empty export name and no information requests. */
  unsigned char go[16 + 6] = "IHAVEOPT";
  uint32_t v = htobe32 (OPT_GO);
  memcpy (go + 8, &v, 4);
  v = htobe32 (6);
  memcpy (go + 12, &v, 4);
  memset (go + 16, 0, 6);
  struct iovec iov[2] = { { &client_flags, 4 }, { go, sizeof go } };
  write_all (iov, 2);

  uint64_t size = 0;
  for (;;) {
    unsigned char h[20];
    read_exact (h, sizeof h);
    uint64_t magic;
    uint32_t type, len;
    memcpy (&magic, h, 8);
    memcpy (&type, h + 12, 4);
    memcpy (&len, h + 16, 4);
    type = be32toh (type);
    len = be32toh (len);
    if (be64toh (magic) != OPTION_REPLY_MAGIC)
      die ("bad option reply magic");
    if (len > 65536)
      die ("option reply of %" PRIu32 " bytes", len);
    unsigned char data[65536];
    read_exact (data, len);
    if (type & 0x80000000u)
      die ("the server refused NBD_OPT_GO (reply type 0x%" PRIx32 ")", type);
    if (type == REP_INFO && len >= 12 && ((data[0] << 8) | data[1]) == INFO_EXPORT) {
      memcpy (&size, data + 2, 8);
      size = be64toh (size);
    }
    if (type == REP_ACK)
      return size;
  }
}

int
main (int argc, char **argv)
{
  const char *socket_path = NULL, *op = NULL;
  uint64_t bs = 0, depth = 0, ops = 0, size = 0, warmup = 300;
  static const struct option longopts[] = {
    { "socket", required_argument, NULL, 'S' },
    { "op", required_argument, NULL, 'o' },
    { "bs", required_argument, NULL, 'b' },
    { "depth", required_argument, NULL, 'd' },
    { "ops", required_argument, NULL, 'n' },
    { "size", required_argument, NULL, 's' },
    { "warmup", required_argument, NULL, 'w' },
    { NULL, 0, NULL, 0 },
  };
  int c;
  program_name = "floor-bench";
  while ((c = getopt_long (argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case 'S': socket_path = optarg; break;
    case 'o': op = optarg; break;
    case 'b': bs = parse_u64 ("--bs", optarg); break;
    case 'd': depth = parse_u64 ("--depth", optarg); break;
    case 'n': ops = parse_u64 ("--ops", optarg); break;
    case 's': size = parse_u64 ("--size", optarg); break;
    case 'w': warmup = parse_u64 ("--warmup", optarg); break;
    default:
      die ("usage: floor-bench --socket PATH --op pread|pwrite --bs BYTES --depth 1 "
           "--ops N [--size BYTES] [--warmup N]");
    }
  }
  if (socket_path == NULL || op == NULL || bs == 0 || ops == 0)
    die ("--socket, --op, --bs and --ops are required");
  if (depth != 1)
    die ("only --depth 1 is supported (one command at a time is the point)");
  int is_write = strcmp (op, "pwrite") == 0;
  if (!is_write && strcmp (op, "pread") != 0)
    die ("--op must be pread or pwrite, got '%s'", op);
  if (bs > 32 * 1024 * 1024)
    die ("--bs %" PRIu64 " exceeds 32 MiB", bs);

  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  if (strlen (socket_path) >= sizeof addr.sun_path)
    die ("socket path too long: %s", socket_path);
  strcpy (addr.sun_path, socket_path);
  fd = socket (AF_UNIX, SOCK_STREAM, 0);
  if (fd == -1 || connect (fd, (struct sockaddr *) &addr, sizeof addr) == -1)
    die ("connect %s: %s", socket_path, strerror (errno));

  uint64_t export_size = handshake ();
  if (size == 0)
    size = export_size;
  if (size > export_size)
    die ("--size %" PRIu64 " exceeds the export size %" PRIu64, size, export_size);
  uint64_t blocks = size / bs;
  if (blocks == 0)
    die ("--bs %" PRIu64 " exceeds --size %" PRIu64, bs, size);

  unsigned char *buf = malloc (bs);
  if (buf == NULL)
    die ("out of memory");
  memset (buf, is_write ? 0xa5 : 0, bs);

  uint64_t user0 = 0, sys0 = 0, user1, sys1;
  double t0 = 0;
  uint64_t total = warmup + ops;
  for (uint64_t i = 0; i < total; i++) {
    if (i == warmup) {
      cpu_times_us (&user0, &sys0);
      t0 = now_seconds ();
    }
    unsigned char req[28];
    uint32_t w32 = htobe32 (REQUEST_MAGIC);
    memcpy (req, &w32, 4);
    uint16_t type = htobe16 (is_write ? CMD_WRITE : CMD_READ);
    memset (req + 4, 0, 2);
    memcpy (req + 6, &type, 2);
    uint64_t cookie = htobe64 (i + 1), offset = htobe64 ((i % blocks) * bs);
    memcpy (req + 8, &cookie, 8);
    memcpy (req + 16, &offset, 8);
    w32 = htobe32 ((uint32_t) bs);
    memcpy (req + 24, &w32, 4);
    struct iovec iov[2] = { { req, sizeof req }, { buf, bs } };
    write_all (iov, is_write ? 2 : 1);

    unsigned char reply[16];
    read_exact (reply, sizeof reply);
    uint32_t magic, error;
    memcpy (&magic, reply, 4);
    memcpy (&error, reply + 4, 4);
    if (be32toh (magic) != SIMPLE_REPLY_MAGIC || memcmp (reply + 8, req + 8, 8) != 0)
      die ("reply out of step with the request");
    if (error != 0)
      die ("the server replied with error %" PRIu32, be32toh (error));
    if (!is_write)
      read_exact (buf, bs);
  }
  double seconds = now_seconds () - t0;
  cpu_times_us (&user1, &sys1);

  /* NBD_CMD_DISC, then close. */
  unsigned char disc[28] = { 0 };
  uint32_t m = htobe32 (REQUEST_MAGIC);
  uint16_t d = htobe16 (CMD_DISC);
  memcpy (disc, &m, 4);
  memcpy (disc + 6, &d, 2);
  struct iovec dv = { disc, sizeof disc };
  write_all (&dv, 1);
  close (fd);

  double user = (double) (user1 - user0), sys = (double) (sys1 - sys0);
  printf ("{\"ops\":%" PRIu64 ",\"seconds\":%.6f,\"opsPerSec\":%.1f,\"mibPerSec\":%.2f,"
          "\"cpuUserUs\":%.0f,\"cpuSystemUs\":%.0f,\"cpuUsPerOp\":%.3f}\n",
          ops, seconds, ops / seconds, ops * (double) bs / seconds / (1024 * 1024),
          user, sys, (user + sys) / ops);
  free (buf);
  return 0;
}
