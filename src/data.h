/* data.h — the training data: a global batch that is a function of (seed, step) alone.
 *
 * Sequence g of the whole run (g = step * global_batch + j) is generated from (seed, g) only, so
 * every mesh sees the same tokens at the same step, and a data-parallel rank simply asks for its
 * slice [first, first + count) of the step's global batch. Each sequence is T+1 byte-level tokens
 * (inputs are tokens[0..T-1], targets tokens[1..T]) and carries a domain id.
 *
 * Sources:
 *  - synthetic: a built-in multi-domain corpus, deterministic from the seed. Domains
 *    (DATA_N_DOMAINS): arithmetic with correct results, sorted lists, copy/reverse tasks, text
 *    from a small grammar. Each sequence is drawn from one domain.
 *  - file: a token file on disk (format below), or a directory whose *.tok files are shards;
 *    sequence g is a window drawn from (seed, g) among all windows of all shards. Domain is 0.
 *    Token files must be regular files (a FIFO, device or directory is refused at open) whose
 *    every token is below the vocab in their header, itself <= the model's vocab. They are read
 *    with pread and must not change while a run reads them: a file that shrinks or changes size,
 *    a short read or a token out of range makes data_get fail with the file and offset named.
 *
 * Token file format (little-endian):
 *   bytes 0-7   magic "MTTOKENS"
 *   u32         format version (1)
 *   u32         bytes per token (2 or 4)
 *   u32         vocab size
 *   u32         reserved (0)
 *   u64         number of tokens
 *   then the tokens (uint16 or uint32).
 * Nothing here communicates.
 */
#ifndef MT_DATA_H
#define MT_DATA_H

#include <stddef.h>
#include <stdint.h>

#define DATA_N_DOMAINS 4
extern const char *const data_domain_names[DATA_N_DOMAINS];

typedef struct Data Data;

/* path: NULL or "synthetic", else a token file or a directory of *.tok shards. vocab: the model's
 * vocab; a file whose vocab or tokens exceed it is refused. seq_len: T. Returns NULL and a message
 * in err (MT_ERRLEN) naming the file and the rule broken. */
Data *data_open(const char *path, int vocab, int seq_len, unsigned long long seed, char *err);
void data_close(Data *d);

/* Fill tokens(count, T+1) and domains(count, may be NULL) with global sequences
 * [first, first + count). MT_OK, or MT_ERR with a message in err naming the file and the token
 * index / byte offset when a token file cannot be read as it was at open (it shrank or changed
 * size, a read failed or came back short, a token is >= the vocab); tokens are then partly
 * filled. The synthetic source never fails. Not collective: the trainer agrees on failure. */
int data_get(Data *d, int64_t first, int count, int32_t *tokens, int32_t *domains, char *err);

/* Write a token file. Returns MT_OK or MT_ERR (message in err). */
int data_write_tokens(const char *path, const uint32_t *tokens, uint64_t n, int bytes_per_token,
                      int vocab, char *err);

/* The same, streamed (for inputs larger than memory): open with the final token count n, put
 * tokens in pieces, close. put refuses tokens >= vocab (or > 65535 at 2 bytes) and more than n in
 * all; close refuses fewer than n. Every call returns NULL / MT_ERR with a message in err; close
 * frees the writer in every case. Atomic: the tokens go to a temporary file next to path, which
 * a successful close fsyncs and renames over path; a failed one (or any earlier failure) removes
 * it, leaving path as it was. An existing path that is not a regular file is refused. */
typedef struct TokenWriter TokenWriter;
TokenWriter *data_writer_open(const char *path, uint64_t n, int bytes_per_token, int vocab,
                              char *err);
int data_writer_put(TokenWriter *w, const uint32_t *tokens, size_t k, char *err);
int data_writer_close(TokenWriter *w, char *err);
/* The temporary file w writes to until close (for a signal handler that removes it). */
const char *data_writer_temp(const TokenWriter *w);

#endif
