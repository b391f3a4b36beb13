/*
 * nc-workload - NovaCron guest memory workload / memory integrity checker.
 *
 * Allocates N MiB, fills every 4 KiB page with content that is a
 * deterministic function of (page index, generation, seed), keeps
 * rewriting pages (bumping their generation) at a bounded rate, and
 * continuously verifies every page against the content it must have.
 * It is used to check that live migration (pause, move, resume) does not
 * lose or corrupt guest memory: a page that was dirtied but not re-sent
 * shows up with an old generation; a damaged page fails the comparison.
 *
 *   nc-workload --mem-mib N [--dirty-mib-s R] [--report-s S]
 *               [--pattern random|text|web] [--verify-mib-s V] [--seed X]
 *
 * Every S seconds it prints exactly one line to stdout:
 *   NOVACRON-WORKLOAD gen=G pages=P verified=V errors=E
 * G: completed rewrite passes over the whole buffer (every page has at
 *    least generation G; the initial fill is generation 0),
 * P: number of pages, V: page verifications so far, E: mismatches so far
 *    (a corrupted page is counted once, then repaired).
 * The first few mismatches are also described on lines starting with
 * "NOVACRON-WORKLOAD-ERROR".
 *
 * Page layout (512 little-endian u64 words):
 *   w[0] = MAGIC, w[1] = page index, w[2] = generation,
 *   w[3..510] = payload (PRNG output, or ASCII text for --pattern text),
 *              for --pattern web: HTML-like text that depends on the page
 *              and seed only, so a rewrite changes just the generation and
 *              checksum words (a web server's heap: cached fragments whose
 *              counters and timestamps tick),
 *   w[511] = checksum of w[0..510].
 *
 * Single-threaded on purpose: the writer and the verifier interleave in
 * one loop, so the expected generation of every page is known exactly:
 *   expected_gen(i) = pass + (i < cursor ? 1 : 0)
 * Before a page is rewritten it is verified too, so corruption cannot be
 * hidden by the rewrite.
 *
 * Build: gcc -static -O2 -o nc-workload workload.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_BYTES 4096u
#define PAGE_WORDS (PAGE_BYTES / 8u)
#define MAGIC 0x4e4f564143524f4eULL /* "NOVACRON" */
#define MAX_ERROR_LINES 20

enum pattern { PAT_RANDOM, PAT_TEXT, PAT_WEB };

/* Vocabulary of the web pattern: markup and words, picked by a PRNG. */
static const char *const web_words[] = {
	"<div class=\"item\">", "</div>", "<span>", "</span>", "<a href=\"/p/", "\">", "</a>",
	"<li>", "</li>", "<td>", "</td>", "price", "order", "customer", "session", "user",
	"cart", "checkout", "product", "review", "rating", "shipping", "the", "and", "with",
	"for", "new", "sale", "today", "free", "delivery", "size", "color", "blue", "red",
	"green", "large", "small", "{\"id\":", "\"name\":", "\"qty\":", "},", "EUR", "USD",
	"\n", "  ", "Berlin", "Paris", "Tokyo", "available", "in stock", "sold out", "more",
};
#define WEB_WORDS (sizeof web_words / sizeof web_words[0])

static volatile sig_atomic_t stop_requested;

static void on_signal(int sig) { (void)sig; stop_requested = 1; }

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t page_checksum(const uint64_t *w)
{
	uint64_t h = 0x6a09e667f3bcc909ULL;
	for (unsigned i = 0; i < PAGE_WORDS - 1; i++) {
		h ^= w[i];
		h *= 0x100000001b3ULL;
		h ^= h >> 29;
	}
	return h;
}

/* Fill w (one page) with the content of page `idx` at generation `gen`. */
static void gen_page(uint64_t *w, uint64_t idx, uint64_t gen, uint64_t seed,
		     enum pattern pat)
{
	w[0] = MAGIC;
	w[1] = idx;
	w[2] = gen;
	if (pat == PAT_RANDOM) {
		/* xorshift64* seeded by (seed, page, generation) */
		uint64_t s = splitmix64(seed ^ splitmix64(idx ^ (gen << 40) ^ (gen >> 24)));
		if (s == 0)
			s = 1;
		for (unsigned i = 3; i < PAGE_WORDS - 1; i++) {
			s ^= s >> 12;
			s ^= s << 25;
			s ^= s >> 27;
			w[i] = s * 0x2545f4914f6cdd1dULL;
		}
	} else if (pat == PAT_WEB) {
		/* Body from (seed, page) only: it survives rewrites unchanged. */
		uint64_t s = splitmix64(seed ^ splitmix64(idx ^ 0x77656221ULL)) | 1;
		char *p = (char *)&w[3];
		size_t len = (PAGE_WORDS - 4) * 8, off = 0;
		while (off < len) {
			s ^= s >> 12;
			s ^= s << 25;
			s ^= s >> 27;
			uint64_t r = s * 0x2545f4914f6cdd1dULL;
			/* memcpy and a small itoa, not snprintf: under TCG the
			 * verifier regenerates every page it checks. */
			char tok[24];
			size_t n = 0;
			if ((r >> 60) < 3) {
				uint64_t v = (r >> 8) % 100000;
				char digits[8];
				size_t d = 0;
				do {
					digits[d++] = (char)('0' + v % 10);
					v /= 10;
				} while (v);
				while (d)
					tok[n++] = digits[--d];
			} else {
				const char *w = web_words[(r >> 16) % WEB_WORDS];
				size_t wl = strlen(w);
				memcpy(tok, w, wl);
				n = wl;
			}
			tok[n++] = ' ';
			size_t c = len - off < n ? len - off : n;
			memcpy(p + off, tok, c);
			off += c;
		}
	} else {
		char line[64];
		int n = snprintf(line, sizeof line,
				 "novacron page %08llx generation %08llx seed %llx\n",
				 (unsigned long long)idx, (unsigned long long)gen,
				 (unsigned long long)(seed & 0xffff));
		char *p = (char *)&w[3];
		size_t len = (PAGE_WORDS - 4) * 8, off = 0;
		while (off < len) {
			size_t c = len - off < (size_t)n ? len - off : (size_t)n;
			memcpy(p + off, line, c);
			off += c;
		}
	}
	w[PAGE_WORDS - 1] = page_checksum(w);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void out(const char *s)
{
	size_t len = strlen(s);
	while (len > 0) {
		ssize_t n = write(STDOUT_FILENO, s, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		s += n;
		len -= (size_t)n;
	}
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s --mem-mib N [--dirty-mib-s R] [--report-s S]\n"
		"          [--pattern random|text|web] [--verify-mib-s V] [--seed X]\n"
		"  --mem-mib N       memory to allocate and check (MiB, >0)\n"
		"  --dirty-mib-s R   rewrite rate in MiB/s (default 20; 0 = write once)\n"
		"  --report-s S      seconds between report lines (default 2)\n"
		"  --pattern P       random (poorly compressible, default), text, or web\n"
		"                    (HTML-like; rewrites change only a counter per page)\n"
		"  --verify-mib-s V  verification rate limit in MiB/s (default 0 = continuous)\n"
		"  --seed X          pattern seed (default 0x4e43)\n",
		argv0);
}

static double parse_num(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end != '\0' || v < 0) {
		fprintf(stderr, "nc-workload: bad value for %s: '%s'\n", opt, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	double mem_mib = 0, dirty_mib_s = 20, report_s = 2, verify_mib_s = 0;
	uint64_t seed = 0x4e43;
	enum pattern pat = PAT_RANDOM;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
			usage(argv[0]);
			return 0;
		}
		if (i + 1 >= argc) {
			usage(argv[0]);
			return 2;
		}
		const char *v = argv[++i];
		if (!strcmp(a, "--mem-mib"))
			mem_mib = parse_num(a, v);
		else if (!strcmp(a, "--dirty-mib-s"))
			dirty_mib_s = parse_num(a, v);
		else if (!strcmp(a, "--report-s"))
			report_s = parse_num(a, v);
		else if (!strcmp(a, "--verify-mib-s"))
			verify_mib_s = parse_num(a, v);
		else if (!strcmp(a, "--seed"))
			seed = strtoull(v, NULL, 0);
		else if (!strcmp(a, "--pattern")) {
			if (!strcmp(v, "random"))
				pat = PAT_RANDOM;
			else if (!strcmp(v, "text"))
				pat = PAT_TEXT;
			else if (!strcmp(v, "web"))
				pat = PAT_WEB;
			else {
				fprintf(stderr, "nc-workload: bad --pattern '%s'\n", v);
				return 2;
			}
		} else {
			usage(argv[0]);
			return 2;
		}
	}
	if (mem_mib <= 0) {
		usage(argv[0]);
		return 2;
	}
	if (report_s <= 0)
		report_s = 2;

	uint64_t npages = (uint64_t)(mem_mib * 256.0);
	if (npages == 0)
		npages = 1;
	size_t bytes = (size_t)npages * PAGE_BYTES;
	uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("nc-workload: mmap");
		return 1;
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	static uint64_t scratch[PAGE_WORDS];
	uint64_t pass = 0, cursor = 0;   /* writer state */
	uint64_t vcursor = 0;            /* verifier state */
	uint64_t verified = 0, errors = 0, error_lines = 0;
	char buf[256];

	/* Initial fill: generation 0. */
	for (uint64_t i = 0; i < npages; i++)
		gen_page(mem + i * PAGE_WORDS, i, 0, seed, pat);

#define EXPECTED_GEN(i) (pass + ((i) < cursor ? 1 : 0))

	/* Compare page i with its expected content; count and report errors. */
#define CHECK_PAGE(i)                                                         \
	do {                                                                  \
		uint64_t _i = (i), _g = EXPECTED_GEN(_i);                     \
		const uint64_t *_p = mem + _i * PAGE_WORDS;                   \
		gen_page(scratch, _i, _g, seed, pat);                         \
		verified++;                                                   \
		if (memcmp(_p, scratch, PAGE_BYTES) != 0) {                   \
			errors++;                                             \
			if (error_lines < MAX_ERROR_LINES) {                  \
				error_lines++;                                \
				snprintf(buf, sizeof buf,                     \
					 "NOVACRON-WORKLOAD-ERROR page=%llu expected_gen=%llu found_magic_ok=%d found_index=%llu found_gen=%llu checksum_ok=%d\n", \
					 (unsigned long long)_i,              \
					 (unsigned long long)_g,              \
					 _p[0] == MAGIC,                      \
					 (unsigned long long)_p[1],           \
					 (unsigned long long)_p[2],           \
					 _p[PAGE_WORDS - 1] == page_checksum(_p)); \
				out(buf);                                     \
			}                                                     \
			/* repair, so each corruption is counted once */      \
			memcpy(mem + _i * PAGE_WORDS, scratch, PAGE_BYTES);   \
		}                                                             \
	} while (0)

	const double tick = 0.01; /* scheduling quantum, seconds */
	double dirty_pages_s = dirty_mib_s * 256.0;
	double verify_pages_s = verify_mib_s * 256.0;
	double t0 = now_s(), last = t0, next_report = t0;
	double write_credit = 0, verify_credit = 0;
	int first_report = 1;

	while (!stop_requested) {
		double t = now_s();
		double dt = t - last;
		last = t;
		if (dt < 0)
			dt = 0;
		if (dt > 1.0) /* e.g. after the VM was paused: no huge catch-up burst */
			dt = 1.0;

		if (t >= next_report) {
			/* The first line gets a leading newline: at boot it usually
			 * follows the console shell's prompt, which ends without one. */
			snprintf(buf, sizeof buf,
				 "%sNOVACRON-WORKLOAD gen=%llu pages=%llu verified=%llu errors=%llu\n",
				 first_report ? "\n" : "",
				 (unsigned long long)pass, (unsigned long long)npages,
				 (unsigned long long)verified, (unsigned long long)errors);
			out(buf);
			first_report = 0;
			next_report += report_s;
			if (next_report < t)
				next_report = t + report_s;
		}

		/* Writer: rewrite pages at dirty_pages_s, verifying each first. */
		if (dirty_pages_s > 0) {
			write_credit += dt * dirty_pages_s;
			if (write_credit > dirty_pages_s)
				write_credit = dirty_pages_s;
			while (write_credit >= 1.0 && !stop_requested) {
				CHECK_PAGE(cursor);
				gen_page(mem + cursor * PAGE_WORDS, cursor, pass + 1, seed, pat);
				cursor++;
				if (cursor == npages) {
					cursor = 0;
					pass++;
				}
				write_credit -= 1.0;
			}
		}

		/* Verifier: sweep all pages, continuously or rate limited. */
		double deadline = t + tick;
		if (verify_pages_s > 0) {
			verify_credit += dt * verify_pages_s;
			if (verify_credit > verify_pages_s)
				verify_credit = verify_pages_s;
			while (verify_credit >= 1.0 && !stop_requested) {
				CHECK_PAGE(vcursor);
				vcursor = (vcursor + 1) % npages;
				verify_credit -= 1.0;
			}
			struct timespec ts = { 0, (long)(tick * 1e9) };
			nanosleep(&ts, NULL);
		} else {
			do {
				for (int k = 0; k < 64; k++) {
					CHECK_PAGE(vcursor);
					vcursor = (vcursor + 1) % npages;
				}
			} while (now_s() < deadline && !stop_requested);
		}
	}

	snprintf(buf, sizeof buf,
		 "NOVACRON-WORKLOAD gen=%llu pages=%llu verified=%llu errors=%llu\n",
		 (unsigned long long)pass, (unsigned long long)npages,
		 (unsigned long long)verified, (unsigned long long)errors);
	out(buf);
	return errors ? 1 : 0;
}
