/* A streaming load generator in C for bench_overhead.py: on a 2-core host the load generator shares the cores
 * with the server it measures, and whatever CPU it takes the engine loses. sse_client.py (Python, uvloop)
 * takes ~27 us a token at 16 streams; this one a few.
 *
 *   sse_load HOST PORT CONCURRENCY [GATHER_US] < bodies   (one /v1/completions JSON body per line)
 *
 * With GATHER_US, each wake-up waits that long before reading, so that one wake-up reads the events of
 * several streams (the server's CPU per token is what is measured; a remote client costs it nothing).
 * One connection per request (Connection: close), `CONCURRENCY` in flight, one epoll loop. It reads the
 * status line, a chunked or plain body, and SSE events; an event whose first choice has text is stamped
 * (CLOCK_MONOTONIC, the clock of Python's time.perf_counter), the usage chunk gives the token counts, an
 * event with an "error" key fails the request. Per request it prints one line:
 *   index error(0/1) prompt_tokens completion_tokens start stamp stamp ...
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    char *body;
    size_t len;
    double start;
    double *stamps;
    int n_stamps, cap_stamps;
    int error, prompt_tokens, completion_tokens;
} Request;

typedef struct {
    int fd, req;          /* the request it carries; fd -1: free */
    char *raw;            /* bytes not yet taken apart: headers, then chunk framing */
    size_t raw_len, raw_cap;
    char *sse;            /* body bytes not yet split into events */
    size_t sse_len, sse_cap;
    int head_done, chunked;
} Conn;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void append(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
    if (*len + n + 1 > *cap) {
        *cap = (*len + n + 1) * 2;
        *buf = realloc(*buf, *cap);
    }
    memcpy(*buf + *len, data, n);
    *len += n;
    (*buf)[*len] = 0;
}

static void consume(char **buf, size_t *len, size_t n) {
    memmove(*buf, *buf + n, *len - n);
    *len -= n;
    (*buf)[*len] = 0;
}

static int number_after(const char *s, const char *key) {
    const char *p = strstr(s, key);
    return p ? atoi(p + strlen(key)) : -1;
}

/* Complete SSE events (a blank line after each) out of c->sse. */
static void events(Conn *c, Request *r, double t) {
    char *end;
    if (!c->sse) return;
    while ((end = strstr(c->sse, "\n\n")) != NULL) {
        size_t n = end - c->sse + 2;
        *end = 0;
        char *data = strstr(c->sse, "data: ");
        if (data && strncmp(data + 6, "[DONE]", 6) != 0) {
            if (strstr(data, "\"error\"")) r->error = 1;
            char *choices = strstr(data, "\"choices\":[{");
            char *text = choices ? strstr(choices, "\"text\":\"") : NULL;
            if (text && text[8] != '"') {
                if (r->n_stamps == r->cap_stamps) {
                    r->cap_stamps = r->cap_stamps ? 2 * r->cap_stamps : 256;
                    r->stamps = realloc(r->stamps, r->cap_stamps * sizeof(double));
                }
                r->stamps[r->n_stamps++] = t;
            }
            if (strstr(data, "\"usage\":{")) {
                r->prompt_tokens = number_after(data, "\"prompt_tokens\":");
                r->completion_tokens = number_after(data, "\"completion_tokens\":");
            }
        }
        consume(&c->sse, &c->sse_len, n);
    }
}

/* New bytes of a response; returns 1 once the response is complete. */
static int received(Conn *c, Request *r, const char *data, size_t n, double t) {
    append(&c->raw, &c->raw_len, &c->raw_cap, data, n);
    if (!c->head_done) {
        char *end = strstr(c->raw, "\r\n\r\n");
        if (!end) return 0;
        *end = 0;
        for (char *p = c->raw; *p; p++) *p = (*p >= 'A' && *p <= 'Z') ? *p + 32 : *p;
        c->chunked = strstr(c->raw, "\r\ntransfer-encoding: chunked") != NULL;
        if (strncmp(c->raw + 9, "200", 3) != 0) r->error = 1;
        c->head_done = 1;
        consume(&c->raw, &c->raw_len, end - c->raw + 4);
    }
    if (!c->chunked) {
        append(&c->sse, &c->sse_len, &c->sse_cap, c->raw, c->raw_len);
        consume(&c->raw, &c->raw_len, c->raw_len);
        events(c, r, t);
        return 0;
    }
    for (;;) {
        char *line = strstr(c->raw, "\r\n");
        if (!line) break;
        size_t size = strtoul(c->raw, NULL, 16), head = line - c->raw + 2;
        if (c->raw_len < head + size + 2) break;
        append(&c->sse, &c->sse_len, &c->sse_cap, c->raw + head, size);
        consume(&c->raw, &c->raw_len, head + size + 2);
        if (size == 0) {
            events(c, r, t);
            return 1;
        }
    }
    events(c, r, t);
    return 0;
}

static Request *reqs;
static int n_reqs, next_req, done;
static struct sockaddr_in addr;
static const char *host;
static int ep;

/* Sends request `req` on a new connection; -1 when it could not connect. */
static int start(Conn *c, int req) {
    Request *r = &reqs[req];
    int fd = socket(AF_INET, SOCK_STREAM, IPPROTO_TCP), one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    r->start = now();
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->req = req;
    c->raw_len = c->sse_len = 0;
    c->head_done = c->chunked = 0;
    char *out = malloc(r->len + 256);
    size_t out_len = sprintf(out, "POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             "Content-Length: %zu\r\nConnection: close\r\n\r\n", host, r->len);
    memcpy(out + out_len, r->body, r->len);
    out_len += r->len;
    for (size_t sent = 0; sent < out_len;) {  /* blocking: a request is small */
        ssize_t w = write(fd, out + sent, out_len - sent);
        if (w <= 0) {
            free(out);
            close(fd);
            c->fd = -1;
            return -1;
        }
        sent += w;
    }
    free(out);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

/* The connection takes the next request that starts; none left: it stays free. */
static void launch(Conn *c) {
    c->fd = -1;
    while (next_req < n_reqs) {
        int req = next_req++;
        if (start(c, req) == 0) return;
        reqs[req].error = 1;
        done++;
    }
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: sse_load HOST PORT CONCURRENCY [GATHER_US] < bodies\n");
        return 2;
    }
    host = argv[1];
    int port = atoi(argv[2]), concurrency = atoi(argv[3]), cap = 0;
    long gather_us = argc == 5 ? atol(argv[4]) : 0;
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t len;
    while ((len = getline(&line, &line_cap, stdin)) > 0) {
        if (line[len - 1] == '\n') line[--len] = 0;
        if (!len) continue;
        if (n_reqs == cap) {
            cap = cap ? 2 * cap : 64;
            reqs = realloc(reqs, cap * sizeof(Request));
        }
        reqs[n_reqs++] = (Request){.body = strdup(line), .len = len, .prompt_tokens = -1, .completion_tokens = -1};
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    inet_pton(AF_INET, host, &addr.sin_addr);
    ep = epoll_create1(0);
    Conn *conns = calloc(concurrency, sizeof(Conn));
    for (int i = 0; i < concurrency; i++) launch(&conns[i]);
    static char buf[1 << 16];
    struct epoll_event evs[64];
    while (done < n_reqs) {
        int n = epoll_wait(ep, evs, 64, 60000);
        if (n <= 0) {
            fprintf(stderr, "sse_load: no progress for 60 s\n");
            break;
        }
        double t = now();
        if (gather_us > 0) {
            /* Let the rest of the step's events arrive (the router sends them one after another), then
               read them all on this wake-up: stamps later by at most this, a few wake-ups a step. */
            struct timespec pause = {.tv_sec = 0, .tv_nsec = gather_us * 1000};
            nanosleep(&pause, NULL);
            n = epoll_wait(ep, evs, 64, 0);
        }
        for (int i = 0; i < n; i++) {
            Conn *c = evs[i].data.ptr;
            Request *r = &reqs[c->req];
            ssize_t got = read(c->fd, buf, sizeof buf);
            if (got > 0 && !received(c, r, buf, got, t)) continue;
            if (got <= 0 && (c->chunked || !c->head_done)) r->error = 1;  /* closed before the end */
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            done++;
            launch(c);
        }
    }
    for (int i = 0; i < n_reqs; i++) {
        Request *r = &reqs[i];
        printf("%d %d %d %d %.9f", i, r->error, r->prompt_tokens, r->completion_tokens, r->start);
        for (int k = 0; k < r->n_stamps; k++) printf(" %.9f", r->stamps[k]);
        printf("\n");
    }
    return 0;
}
