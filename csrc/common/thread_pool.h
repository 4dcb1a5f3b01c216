// A small fixed pool of worker threads for the CPU kernels.
//
// Why not OpenMP: torch's CPU wheel bundles its own libgomp, and a second OpenMP runtime in the
// same process gives two thread pools fighting over the same cores. This pool is tiny, its
// threads sleep as soon as a job is done (so they never steal the cores from torch's pool between
// our calls), and it is used by one caller at a time (calls from several Python threads are
// serialised, since each call already uses every core).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace cgq {

// Calls fn(begin, end) on disjoint, contiguous chunks that cover [0, n) (chunk boundaries are
// multiples of `grain`), using up to min(num_threads(), max_jobs) threads including the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn, int max_jobs = 1 << 30);

// Runs fn(job, n_jobs) for job = 0 .. n_jobs - 1, each job on its own thread at the same time (the
// caller runs job 0), with n_jobs = min(num_threads(), max_jobs). For work whose stages are
// separated by SpinBarrier: one wake-up for the whole region instead of one per stage.
void parallel_region(int max_jobs, const std::function<void(int, int)>& fn);

// A reusable barrier for the n jobs of one parallel_region. Waiters spin (with pause, yielding
// to the OS now and then in case the machine is oversubscribed): it is meant for stages a few
// hundred microseconds long whose jobs all run at once, where a futex sleep/wake round trip
// (tens of microseconds, sometimes milliseconds) costs more than the imbalance it waits out: with
// barriers that slept, two jobs decoded slower than one (docs/cpu-kernels.md, "Threads").
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ <= 1) return;
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == gen;) {
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#endif
      if (++spins == 1 << 14) {
        spins = 0;
        std::this_thread::yield();
      }
    }
  }

 private:
  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Threads used by parallel_for. Defaults to CODEGEN_Q_NUM_THREADS, else the CPUs this process may
// run on. set_num_threads(n) with n >= 1 resizes the pool.
int get_num_threads();
void set_num_threads(int n);

}  // namespace cgq
