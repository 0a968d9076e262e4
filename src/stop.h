/* stop.h — graceful stop on SIGTERM / SIGUSR1 (SLURM's warning signal, a user's kill).
 *
 * The handler only records that a signal arrived (the one process-wide flag here). The training
 * loop asks stop_requested() after every step and all ranks agree (an all-reduce in train.c), so
 * every rank stops after the same step, writes the checkpoint and exits 0.
 */
#ifndef MT_STOP_H
#define MT_STOP_H

void stop_install(void);
/* The signal received by this process (0 if none). */
int stop_requested(void);

#endif
