/* stop.h — graceful stop on SIGTERM / SIGUSR1 (SLURM's warning signal, a user's kill) and on a
 * first Ctrl-C (SIGINT; a second one quits at once, exit 130, without a checkpoint).
 *
 * The handler only records that a signal arrived (the one process-wide flag here; the watchdog's
 * message is the other piece of signal-handler state). The training
 * loop asks stop_requested() after every step and all ranks agree (an all-reduce in train.c), so
 * every rank stops after the same step, writes the checkpoint and exits 0.
 */
#ifndef MT_STOP_H
#define MT_STOP_H

void stop_install(void);
/* The signal received by this process (0 if none). */
int stop_requested(void);

/* Watchdog for a step that must not hang (a checkpoint write): if stop_watchdog_disarm is not
 * called within seconds (> 0; 0 = no watchdog), SIGALRM prints message (with this rank) and ends
 * the process with exit code 2, which makes mpirun / srun end the others. For work that can
 * block inside a library's collective call, where no error ever comes back. */
void stop_watchdog_arm(double seconds, int rank, const char *message);
void stop_watchdog_disarm(void);

#endif
