/*
 * nc-nettest - NovaCron guest network probe: what a guest's peers see of
 * its network while it moves (live migration) or is firewalled.
 *
 *   nc-nettest udp-send HOST PORT RATE     RATE datagrams/s, each a 32-bit
 *                                          big-endian sequence number
 *   nc-nettest udp-recv PORT               prints once a second:
 *     NOVACRON-UDP recv=N lost=L max_gap_ms=G gap_ms=g last=S
 *       N: datagrams received, L: sequence numbers missing below the highest
 *       seen (S), G: longest time between two received datagrams, g: the
 *       same for the datagrams received since the last line
 *       (a receiver in a paused guest does not see the pause: its clock
 *       stops too; measure gaps on the other side)
 *   nc-nettest tcp-send HOST PORT KIB_S    one connection, a byte stream at
 *                                          KIB_S KiB/s (0: as fast as it goes):
 *                                          byte i = (i * 131 + (i >> 16)) & 0xff
 *   nc-nettest tcp-recv PORT               accepts one connection, checks every
 *                                          byte, prints once a second:
 *     NOVACRON-TCP bytes=N errors=E state=open|closed
 *
 * A sender that fails prints "NOVACRON-NETTEST-ERROR <what>" and exits 1.
 *
 * Build: gcc -static -O2 -o nc-nettest nettest.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static _Noreturn void fail(const char *what)
{
	printf("NOVACRON-NETTEST-ERROR %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static struct sockaddr_in addr_of(const char *host, const char *port)
{
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_port = htons((uint16_t)atoi(port));
	if (host == NULL)
		a.sin_addr.s_addr = htonl(INADDR_ANY);
	else if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		errno = EINVAL;
		fail("address");
	}
	return a;
}

/* A rate of 0 or less: as fast as it goes. */
static void pace(double start, double n, double per_s)
{
	if (per_s <= 0)
		return;
	double due = start + n * 1e3 / per_s;
	double wait = due - now_ms();
	if (wait > 0)
		usleep((useconds_t)(wait * 1e3));
}

static _Noreturn void udp_send(const char *host, const char *port, double rate)
{
	struct sockaddr_in a = addr_of(host, port);
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	if (s < 0)
		fail("socket");
	double start = now_ms();
	for (uint32_t seq = 0;; seq++) {
		uint32_t be = htonl(seq);
		/* A send that fails (no route for a moment) is a lost datagram. */
		sendto(s, &be, sizeof be, 0, (struct sockaddr *)&a, sizeof a);
		pace(start, seq + 1, rate);
	}
}

static _Noreturn void udp_recv(const char *port)
{
	struct sockaddr_in a = addr_of(NULL, port);
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0)
		fail("bind");
	unsigned long received = 0, distinct = 0;
	long long highest = -1, lowest = -1;
	double last_at = 0, max_gap = 0, gap = 0, next_report = now_ms() + 1000;
	/* Seen sequence numbers, to count each once (duplicates, reordering). */
	static unsigned char seen[1 << 20];
	for (;;) {
		struct pollfd p = {.fd = s, .events = POLLIN};
		int left = (int)(next_report - now_ms());
		if (left > 0 && poll(&p, 1, left) > 0) {
			uint32_t be;
			if (recvfrom(s, &be, sizeof be, 0, NULL, NULL) == sizeof be) {
				uint32_t seq = ntohl(be) & ((1u << 23) - 1);
				double t = now_ms();
				if (last_at > 0 && t - last_at > max_gap)
					max_gap = t - last_at;
				if (last_at > 0 && t - last_at > gap)
					gap = t - last_at;
				last_at = t;
				received++;
				if (!(seen[seq >> 3] & (1u << (seq & 7)))) {
					seen[seq >> 3] |= 1u << (seq & 7);
					distinct++;
				}
				if ((long long)seq > highest)
					highest = seq;
				if (lowest < 0 || (long long)seq < lowest)
					lowest = seq;
			}
			continue;
		}
		long long expected = highest >= 0 ? highest - lowest + 1 : 0;
		printf("NOVACRON-UDP recv=%lu lost=%lld max_gap_ms=%.0f gap_ms=%.0f last=%lld\n", received,
		       expected - (long long)distinct, max_gap, gap, highest);
		fflush(stdout);
		gap = 0;
		next_report = now_ms() + 1000;
	}
}

static unsigned char pattern(uint64_t i)
{
	return (unsigned char)((i * 131 + (i >> 16)) & 0xff);
}

static _Noreturn void tcp_send(const char *host, const char *port, double kib_s)
{
	struct sockaddr_in a = addr_of(host, port);
	int s = socket(AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		fail("socket");
	if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
		fail("connect");
	unsigned char buf[1024];
	uint64_t sent = 0;
	double start = now_ms();
	for (double n = 0;; n++) {
		for (int i = 0; i < 1024; i++)
			buf[i] = pattern(sent + i);
		ssize_t off = 0;
		while (off < 1024) {
			ssize_t w = write(s, buf + off, 1024 - off);
			if (w <= 0)
				fail("write");
			off += w;
		}
		sent += 1024;
		pace(start, n + 1, kib_s);
	}
}

static _Noreturn void tcp_recv(const char *port)
{
	struct sockaddr_in a = addr_of(NULL, port);
	int l = socket(AF_INET, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1) < 0)
		fail("listen");
	int s = accept(l, NULL, NULL);
	if (s < 0)
		fail("accept");
	uint64_t bytes = 0, errors = 0;
	const char *state = "open";
	double next_report = now_ms() + 1000;
	unsigned char buf[4096];
	for (;;) {
		struct pollfd p = {.fd = s, .events = POLLIN};
		int left = (int)(next_report - now_ms());
		if (*state == 'o' && left > 0 && poll(&p, 1, left) > 0) {
			ssize_t r = read(s, buf, sizeof buf);
			if (r <= 0) {
				state = "closed";
				continue;
			}
			for (ssize_t i = 0; i < r; i++)
				if (buf[i] != pattern(bytes + i))
					errors++;
			bytes += r;
			continue;
		}
		if (*state == 'c' && left > 0)
			usleep(left * 1000);
		printf("NOVACRON-TCP bytes=%llu errors=%llu state=%s\n", (unsigned long long)bytes,
		       (unsigned long long)errors, state);
		fflush(stdout);
		next_report = now_ms() + 1000;
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 5 && !strcmp(argv[1], "udp-send"))
		udp_send(argv[2], argv[3], atof(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "udp-recv"))
		udp_recv(argv[2]);
	if (argc == 5 && !strcmp(argv[1], "tcp-send"))
		tcp_send(argv[2], argv[3], atof(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "tcp-recv"))
		tcp_recv(argv[2]);
	fprintf(stderr, "usage: nc-nettest udp-send HOST PORT RATE | udp-recv PORT | "
			"tcp-send HOST PORT KIB_S | tcp-recv PORT\n");
	return 2;
}
