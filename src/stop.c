/* stop.c — see stop.h. */
#include "stop.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static volatile sig_atomic_t g_signal = 0;

static void on_signal(int sig) { g_signal = sig; }

/* Ctrl-C: the first one stops gracefully like SIGTERM; a second one ends the process at once. */
static void on_interrupt(int sig) {
    static const char first[] = "\nmoetrain: interrupted: stopping after this step with a checkpoint "
                                "(Ctrl-C again to quit without one)\n";
    if (g_signal == SIGINT) _exit(130);
    g_signal = sig;
    ssize_t n = write(STDERR_FILENO, first, sizeof first - 1);
    (void)n;
}

void stop_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_interrupt;
    sigaction(SIGINT, &sa, NULL);
}

int stop_requested(void) { return g_signal; }

static char g_watchdog_msg[512]; /* formatted when armed: the handler may only write(2) it */

static void on_alarm(int sig) {
    (void)sig;
    ssize_t n = write(STDERR_FILENO, g_watchdog_msg, strlen(g_watchdog_msg));
    (void)n;
    _exit(2);
}

static void set_timer(double seconds) {
    struct itimerval t;
    memset(&t, 0, sizeof t);
    t.it_value.tv_sec = (time_t)seconds;
    t.it_value.tv_usec = (suseconds_t)((seconds - (double)t.it_value.tv_sec) * 1e6);
    if (seconds > 0 && t.it_value.tv_sec == 0 && t.it_value.tv_usec == 0) t.it_value.tv_usec = 1;
    setitimer(ITIMER_REAL, &t, NULL);
}

void stop_watchdog_arm(double seconds, int rank, const char *message) {
    if (seconds <= 0) return;
    snprintf(g_watchdog_msg, sizeof g_watchdog_msg, "moetrain: error (rank %d): %s (after %g s)\n",
             rank, message, seconds);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    set_timer(seconds);
}

void stop_watchdog_disarm(void) { set_timer(0); }
