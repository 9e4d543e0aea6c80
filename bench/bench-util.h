/* bench-util.h: what bench/libnbd-bench.c and bench/floor.c share (their messages, their
 * size arguments and their clocks).  Each program sets program_name first thing in main. */

#ifndef BENCH_UTIL_H
#define BENCH_UTIL_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <sys/time.h>

static const char *program_name = "bench";

static void __attribute__ ((noreturn, format (printf, 1, 2)))
die (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "%s: ", program_name);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
  exit (EXIT_FAILURE);
}

/* A non-negative integer with an optional binary suffix k, m or g (KiB, MiB, GiB). */
static uint64_t
parse_u64 (const char *name, const char *s)
{
  char *end;
  unsigned long long v;

  errno = 0;
  if (s[0] == '-')
    die ("%s: expected a non-negative integer, got '%s'", name, s);
  v = strtoull (s, &end, 0);
  if (errno != 0 || end == s)
    die ("%s: expected a non-negative integer, got '%s'", name, s);
  switch (*end) {
  case 'k': case 'K': v <<= 10; end++; break;
  case 'm': case 'M': v <<= 20; end++; break;
  case 'g': case 'G': v <<= 30; end++; break;
  }
  if (*end != '\0')
    die ("%s: trailing characters in '%s'", name, s);
  return v;
}

static double
now_seconds (void)
{
  struct timespec ts;

  if (clock_gettime (CLOCK_MONOTONIC, &ts) == -1)
    die ("clock_gettime: %s", strerror (errno));
  return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* User and system CPU time of the process so far, in microseconds. */
static void
cpu_times_us (uint64_t *user_us, uint64_t *system_us)
{
  struct rusage ru;

  if (getrusage (RUSAGE_SELF, &ru) == -1)
    die ("getrusage: %s", strerror (errno));
  *user_us = (uint64_t) ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
  *system_us = (uint64_t) ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
}

#endif /* BENCH_UTIL_H */
