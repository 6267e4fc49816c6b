#include "parallel/stop_signal.h"

#include <atomic>
#include <csignal>

namespace crash {

namespace {

std::atomic<int> g_signal{0};

extern "C" void on_stop_signal(int sig) {
  // A second SIGTERM means "now": the default action, as if no handler were there.
  if (sig == SIGTERM && g_signal.load() != 0) {
    std::signal(SIGTERM, SIG_DFL);
    std::raise(SIGTERM);
    return;
  }
  g_signal.store(sig);
}

}  // namespace

void install_stop_handlers() {
  static bool installed = false;
  if (installed) return;
  installed = true;
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // MPI and file calls go on; the flag is read at the next step
  sigaction(SIGUSR1, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

bool stop_signalled() { return g_signal.load() != 0; }

bool stop_agreed(Communicator& comm) {
  auto flag = torch::full({1}, stop_signalled() ? 1 : 0, torch::kInt32);
  comm.allreduce(flag, ReduceOp::Max);
  return flag.item<int>() != 0;
}

}  // namespace crash
