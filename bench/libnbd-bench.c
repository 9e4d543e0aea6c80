/* libnbd-bench: the reference side of `npm run bench`.
 *
 * Drives one libnbd handle over a Unix socket with exactly DEPTH commands in
 * flight (nbd_aio_pread / nbd_aio_pwrite with completion callbacks, refilled
 * from the main loop around nbd_poll), walking offsets sequentially through
 * the export and wrapping around.  After WARMUP untimed operations it times
 * OPS operations with CLOCK_MONOTONIC and prints one JSON line:
 *
 *   {"ops":N,"seconds":s,"opsPerSec":x,"mibPerSec":y,
 *    "cpuUserUs":u,"cpuSystemUs":k,"cpuUsPerOp":c}
 *
 * The CPU figures are getrusage (RUSAGE_SELF) taken just before and just
 * after the timed phase: user and system time of the whole process (every
 * thread) spent on those OPS operations, in microseconds, and their sum
 * divided by OPS.
 *
 * bench/ours.js runs the identical workload with nbd-client.
 *
 * Build:
 *   cc -O2 -o bench/build/libnbd-bench bench/libnbd-bench.c \
 *      $(pkg-config --cflags --libs libnbd)
 *
 * Usage:
 *   libnbd-bench --socket PATH --op pread|pwrite --bs BYTES --depth N
 *                [--ops N | --seconds S] [--size BYTES] [--warmup N]
 *                [--busy-ns N]
 *
 * --size defaults to the export size (and may not exceed it); offsets run
 * over [0, size rounded down to a multiple of bs).  --seconds runs for
 * roughly that long instead of a fixed op count (the count actually done is
 * reported).  --busy-ns makes the client spin for N nanoseconds each time it
 * is about to issue commands, as if it had that much more work per refill:
 * an experiment on what client CPU on each command's path costs (see
 * bench/README.md); run.js never passes it.  Any failure prints a message on
 * stderr and exits 1.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/time.h>

#include <libnbd.h>

#include "bench-util.h"

static struct nbd_handle *nbd;

/* Workload parameters. */
static bool is_write;
static uint64_t block_size;
static unsigned depth;
static uint64_t next_block;     /* index of the next block to touch */
static uint64_t blocks_in_span; /* offsets walk over this many blocks */

/* One slot per command that may be in flight; each read slot owns a buffer. */
struct slot {
  unsigned index;
  void *buf;
};
static struct slot *slots;
static unsigned *free_slots;    /* stack of idle slot indexes */
static unsigned n_free;
static void *write_buf;         /* shared by every pwrite: it is only read */
static uint64_t busy_ns;        /* --busy-ns: spin this long before each refill */

/* Progress of the current phase, updated by the completion callback. */
static uint64_t completed;
static int command_error;       /* first errno reported to a callback */

static void __attribute__ ((noreturn))
die_nbd (const char *what)
{
  const char *msg = nbd_get_error ();
  die ("%s: %s (errno %d)", what, msg ? msg : "unknown error", nbd_get_errno ());
}

static int
on_complete (void *user_data, int *error)
{
  struct slot *s = user_data;

  if (*error != 0 && command_error == 0)
    command_error = *error;
  completed++;
  free_slots[n_free++] = s->index;
  return 1;                     /* retire the command automatically */
}

static void
issue (struct slot *s)
{
  uint64_t offset = (next_block % blocks_in_span) * block_size;
  nbd_completion_callback cb = { .callback = on_complete, .user_data = s };
  int64_t cookie;

  next_block++;
  if (is_write)
    cookie = nbd_aio_pwrite (nbd, write_buf, block_size, offset, cb, 0);
  else
    cookie = nbd_aio_pread (nbd, s->buf, block_size, offset, cb, 0);
  if (cookie == -1)
    die_nbd (is_write ? "nbd_aio_pwrite" : "nbd_aio_pread");
}

/* Run N operations (or, if N is 0 and max_seconds > 0, run until that much
 * time has passed) keeping DEPTH in flight.  Returns the number completed.
 */
static uint64_t
run_phase (uint64_t n, double max_seconds)
{
  uint64_t issued = 0;
  bool timed = n == 0 && max_seconds > 0;
  double deadline = timed ? now_seconds () + max_seconds : 0;
  bool stop_issuing = false;
  unsigned check = 0;

  completed = 0;
  for (;;) {
    if (command_error != 0)
      die ("%s failed: %s", is_write ? "pwrite" : "pread",
           strerror (command_error));

    if (timed && !stop_issuing && (++check & 15) == 0 &&
        now_seconds () >= deadline)
      stop_issuing = true;

    if (busy_ns > 0 && n_free > 0 && !stop_issuing) {
      double until = now_seconds () + (double) busy_ns * 1e-9;

      while (now_seconds () < until)
        ;
    }
    while (n_free > 0 && !stop_issuing && (timed || issued < n)) {
      issue (&slots[free_slots[--n_free]]);
      issued++;
    }

    if (completed == issued && (stop_issuing || (!timed && issued == n)))
      break;

    /* At least one command is in flight, so blocking is safe. */
    if (nbd_poll (nbd, -1) == -1)
      die_nbd ("nbd_poll");
  }
  if (command_error != 0)
    die ("%s failed: %s", is_write ? "pwrite" : "pread",
         strerror (command_error));
  return completed;
}

static void __attribute__ ((noreturn))
usage (FILE *fp, int status)
{
  fprintf (fp,
           "usage: libnbd-bench --socket PATH --op pread|pwrite --bs BYTES "
           "--depth N\n"
           "                    [--ops N | --seconds S] [--size BYTES] "
           "[--warmup N] [--busy-ns N]\n");
  exit (status);
}

int
main (int argc, char *argv[])
{
  static const struct option long_options[] = {
    { "socket",  required_argument, NULL, 'U' },
    { "op",      required_argument, NULL, 'o' },
    { "bs",      required_argument, NULL, 'b' },
    { "depth",   required_argument, NULL, 'd' },
    { "ops",     required_argument, NULL, 'n' },
    { "seconds", required_argument, NULL, 't' },
    { "size",    required_argument, NULL, 's' },
    { "warmup",  required_argument, NULL, 'w' },
    { "busy-ns", required_argument, NULL, 'B' },
    { "psk-file", required_argument, NULL, 'P' },
    { "psk-user", required_argument, NULL, 'u' },
    { "help",    no_argument,       NULL, 'h' },
    { NULL, 0, NULL, 0 }
  };
  const char *socket_path = NULL, *op = NULL, *psk_file = NULL, *psk_user = NULL;
  uint64_t ops = 0, size = 0, warmup = 300, depth_arg = 0;
  double seconds = 0;
  int64_t export_size;
  unsigned i;
  int c;

  program_name = "libnbd-bench";
  while ((c = getopt_long (argc, argv, "", long_options, NULL)) != -1) {
    switch (c) {
    case 'U': socket_path = optarg; break;
    case 'P': psk_file = optarg; break;
    case 'u': psk_user = optarg; break;
    case 'o': op = optarg; break;
    case 'b': block_size = parse_u64 ("--bs", optarg); break;
    case 'd': depth_arg = parse_u64 ("--depth", optarg); break;
    case 'n': ops = parse_u64 ("--ops", optarg); break;
    case 's': size = parse_u64 ("--size", optarg); break;
    case 'w': warmup = parse_u64 ("--warmup", optarg); break;
    case 'B': busy_ns = parse_u64 ("--busy-ns", optarg); break;
    case 't': {
      char *end;
      errno = 0;
      seconds = strtod (optarg, &end);
      if (errno != 0 || end == optarg || *end != '\0' || !(seconds > 0))
        die ("--seconds: expected a positive number, got '%s'", optarg);
      break;
    }
    case 'h': usage (stdout, EXIT_SUCCESS);
    default: usage (stderr, EXIT_FAILURE);
    }
  }
  if (optind != argc)
    die ("unexpected argument '%s'", argv[optind]);
  if (socket_path == NULL || op == NULL || block_size == 0 || depth_arg == 0)
    usage (stderr, EXIT_FAILURE);
  if (strcmp (op, "pread") == 0)
    is_write = false;
  else if (strcmp (op, "pwrite") == 0)
    is_write = true;
  else
    die ("--op must be pread or pwrite, got '%s'", op);
  if ((ops == 0) == (seconds == 0))
    die ("give exactly one of --ops N (N > 0) and --seconds S");
  if (depth_arg > 65536)
    die ("--depth %" PRIu64 " is unreasonably large", depth_arg);
  if (block_size > 64 * 1024 * 1024)
    die ("--bs %" PRIu64 " exceeds the 64 MiB NBD payload limit", block_size);
  depth = (unsigned) depth_arg;

  nbd = nbd_create ();
  if (nbd == NULL)
    die_nbd ("nbd_create");
  if (psk_file != NULL) {
    if (nbd_set_tls (nbd, LIBNBD_TLS_REQUIRE) == -1 ||
        nbd_set_tls_psk_file (nbd, psk_file) == -1 ||
        (psk_user != NULL && nbd_set_tls_username (nbd, psk_user) == -1))
      die_nbd ("nbd_set_tls");
  }
  if (nbd_connect_unix (nbd, socket_path) == -1)
    die_nbd ("nbd_connect_unix");
  export_size = nbd_get_size (nbd);
  if (export_size == -1)
    die_nbd ("nbd_get_size");
  if (size == 0)
    size = (uint64_t) export_size;
  if (size > (uint64_t) export_size)
    die ("--size %" PRIu64 " exceeds the export size %" PRId64,
         size, export_size);
  if (is_write) {
    int ro = nbd_is_read_only (nbd);
    if (ro == -1)
      die_nbd ("nbd_is_read_only");
    if (ro)
      die ("the export is read-only; cannot benchmark pwrite");
  }
  blocks_in_span = size / block_size;
  if (blocks_in_span == 0)
    die ("the export (%" PRIu64 " bytes) is smaller than one block", size);

  slots = calloc (depth, sizeof *slots);
  free_slots = calloc (depth, sizeof *free_slots);
  if (slots == NULL || free_slots == NULL)
    die ("calloc: %s", strerror (errno));
  for (i = 0; i < depth; i++) {
    slots[i].index = i;
    if (!is_write) {
      slots[i].buf = malloc (block_size);
      if (slots[i].buf == NULL)
        die ("malloc: %s", strerror (errno));
      memset (slots[i].buf, 0, block_size);
    }
    free_slots[n_free++] = depth - 1 - i;
  }
  if (is_write) {
    unsigned char *p = malloc (block_size);
    uint64_t j;

    if (p == NULL)
      die ("malloc: %s", strerror (errno));
    /* Non-zero data, so a sparse server really stores it. */
    for (j = 0; j < block_size; j++)
      p[j] = (unsigned char) (j * 131 + 7);
    write_buf = p;
  }

  if (warmup > 0)
    run_phase (warmup, 0);

  {
    uint64_t user0, sys0, user1, sys1;
    double t0, elapsed, ops_per_sec, mib_per_sec, cpu_per_op;
    uint64_t done;

    cpu_times_us (&user0, &sys0);
    t0 = now_seconds ();
    done = run_phase (ops, seconds);
    elapsed = now_seconds () - t0;
    cpu_times_us (&user1, &sys1);
    ops_per_sec = (double) done / elapsed;
    mib_per_sec = ops_per_sec * (double) block_size / (1024.0 * 1024.0);
    cpu_per_op = done > 0 ? (double) ((user1 - user0) + (sys1 - sys0)) / (double) done : 0;

    if (printf ("{\"ops\":%" PRIu64 ",\"seconds\":%.6f,"
                "\"opsPerSec\":%.1f,\"mibPerSec\":%.2f,"
                "\"cpuUserUs\":%" PRIu64 ",\"cpuSystemUs\":%" PRIu64 ","
                "\"cpuUsPerOp\":%.3f}\n",
                done, elapsed, ops_per_sec, mib_per_sec,
                user1 - user0, sys1 - sys0, cpu_per_op) < 0 ||
        fflush (stdout) == EOF)
      die ("writing the result: %s", strerror (errno));
  }

  if (nbd_shutdown (nbd, 0) == -1)
    die_nbd ("nbd_shutdown");
  nbd_close (nbd);

  for (i = 0; i < depth; i++)
    free (slots[i].buf);
  free (slots);
  free (free_slots);
  free (write_buf);
  return EXIT_SUCCESS;
}
