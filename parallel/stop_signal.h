// Graceful stop: SIGUSR1 (Slurm's --signal, sent before the time limit) and SIGTERM set a flag;
// long loops ask stop_agreed() at a step boundary, so every rank stops at the same step.
#pragma once
#include <stdexcept>

#include "parallel/comm.h"

namespace crash {

// Exit code of a run that stopped on a signal after writing what it needs to resume.
constexpr int kExitStopped = 3;

// Thrown on every rank at once when a run stops on a signal; main() exits with kExitStopped.
struct StopRequested : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Installs the handlers (idempotent). A second SIGTERM ends the process as usual.
void install_stop_handlers();
// True once this process received SIGUSR1 or SIGTERM.
bool stop_signalled();
// Collective over `comm`: true on every rank when any rank was signalled.
bool stop_agreed(Communicator& comm);

}  // namespace crash
