// Collection: every layer's hidden states on a list of examples, pooled per example (or all
// their tokens), written into an activation archive (analysis/archive.h) by all ranks together.
// The examples are cut into blocks; in round r, DP replica d runs block r * dp + d, and a
// round whose blocks are all in the archive already (a resumed run) is skipped by every rank.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "analysis/archive.h"
#include "framework/distributed_lm.h"

namespace crash {

// The round schedule over `blocks` blocks on `dp` replicas.
int64_t collection_rounds(int64_t blocks, int64_t dp);
// The block replica `dp_rank` runs in round r; blocks past the last mean nothing to run.
int64_t round_block(int64_t round, int64_t dp, int64_t dp_rank);
// Whether every block of round r is done (all ranks agree, so all skip it).
bool round_done(const std::vector<uint8_t>& blocks_done, int64_t round, int64_t dp);
// How many of `num_examples` examples lie in the blocks done (the last block may be short).
int64_t examples_done(const std::vector<uint8_t>& blocks_done, int64_t block_size, int64_t num_examples);

// The examples [first, first + n) sorted by length (stable: equal lengths keep their order) and
// cut into `groups` runs of near-equal size (at most n runs, none empty).
std::vector<std::vector<int64_t>> length_sorted_groups(const std::vector<std::vector<int64_t>>& seqs, int64_t first,
                                                       int64_t n, int64_t groups);

struct CollectSettings {
  int64_t length_groups = 4;     // forward passes per block, over its examples sorted by length
  int micro_batches = 1;         // pipeline micro-batches per pass (one where they do not divide it)
  std::string pooling = "mean";  // analysis/pooling.h; "none" keeps every token
  bool pad_left = false;
  int fail_after_rounds = -1;  // test hook: the world's last rank throws after this many rounds
};

// Runs every block the archive lacks and writes it. `spec` is the archive's (block size,
// pooled or token offsets); `seqs` its examples. Collective over the model's grid; logs
// progress after each round. The caller completes the archive.
void collect_activations(DistributedLM& model, ActivationArchive& archive, const ArchiveSpec& spec,
                         const std::vector<std::vector<int64_t>>& seqs, const CollectSettings& settings);

}  // namespace crash
