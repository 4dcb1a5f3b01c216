#include "common/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CGQ_CPU_RELAX() _mm_pause()
#else
#define CGQ_CPU_RELAX() std::this_thread::yield()
#endif

namespace cgq {
namespace {

// Idle workers sleep at once (no spin-wait): torch runs its own ops on its own OpenMP threads
// between our kernels, and on a machine with as many threads as cores any spinning thread, ours
// or libgomp's, steals the core the other pool needs: with both pools spinning a decode step took
// many times longer (docs/cpu-kernels.md, "Threads"; codegen_q/__init__.py makes libgomp passive).

int default_num_threads() {
  if (const char* env = std::getenv("CODEGEN_Q_NUM_THREADS")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= 4096) return static_cast<int>(v);
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

class Pool {
 public:
  explicit Pool(int n_threads) : n_threads_(n_threads) {
    for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      stopping_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    sleep_cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  int size() const { return n_threads_; }

  void run(int n_jobs, const std::function<void(int)>& job) {
    if (n_jobs <= 1 || n_threads_ == 1) {
      for (int j = 0; j < n_jobs; ++j) job(j);
      return;
    }
    job_ = &job;
    n_jobs_ = n_jobs;
    // Every worker acknowledges every generation, with or without a job in it: otherwise a worker
    // still waking up for this call could read the *next* call's job_ / n_jobs_ and run a job twice.
    pending_.store(n_threads_ - 1, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      generation_.fetch_add(1, std::memory_order_release);
    }
    sleep_cv_.notify_all();
    job(0);
    // Spin for the other jobs (they usually end within microseconds of job 0), but yield the core
    // now and then: when more threads are runnable than there are cores (the quantizer's writer
    // thread beside two jobs), a worker may be waiting for this very core.
    for (int spins = 0; pending_.load(std::memory_order_acquire) != 0;) {
      CGQ_CPU_RELAX();
      if (++spins == 1 << 10) {
        spins = 0;
        std::this_thread::yield();
      }
    }
    job_ = nullptr;
  }

 private:
  void worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      wait_for_new_generation(seen);
      seen = generation_.load(std::memory_order_acquire);
      if (stopping_) return;
      if (index < n_jobs_) (*job_)(index);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void wait_for_new_generation(uint64_t seen) {
    std::unique_lock<std::mutex> lock(sleep_mutex_);
    sleep_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
  }

  const int n_threads_;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  const std::function<void(int)>* job_ = nullptr;
  int n_jobs_ = 0;
  std::atomic<bool> stopping_{false};
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
};

std::mutex g_pool_mutex;  // one parallel_for at a time; guards g_pool
std::unique_ptr<Pool> g_pool;
int g_requested_threads = 0;

void forget_pool_in_child() {
  // After fork() only the forking thread exists in the child: the old workers are gone, so drop
  // the pool without joining them (leaking it) and let the child start a fresh one on demand.
  (void)g_pool.release();
  new (&g_pool_mutex) std::mutex();
}

Pool& pool_locked() {
  static const bool registered = [] {
    pthread_atfork(nullptr, nullptr, forget_pool_in_child);
    return true;
  }();
  (void)registered;
  if (g_requested_threads == 0) g_requested_threads = default_num_threads();
  if (!g_pool || g_pool->size() != g_requested_threads) {
    g_pool.reset();
    g_pool = std::make_unique<Pool>(g_requested_threads);
  }
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn, int max_jobs) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t units = (n + grain - 1) / grain;
  // One job per thread, never more jobs than grains; each job takes one contiguous share.
  parallel_region(units < max_jobs ? static_cast<int>(units) : max_jobs, [&](int j, int n_jobs) {
    const int64_t begin = units * j / n_jobs * grain;
    int64_t end = units * (j + 1) / n_jobs * grain;
    if (end > n) end = n;
    if (begin < end) fn(begin, end);
  });
}

void parallel_region(int max_jobs, const std::function<void(int, int)>& fn) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  Pool& pool = pool_locked();
  int n_jobs = pool.size() < max_jobs ? pool.size() : max_jobs;
  if (n_jobs < 1) n_jobs = 1;
  pool.run(n_jobs, [&](int j) { fn(j, n_jobs); });
}

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_requested_threads == 0) g_requested_threads = default_num_threads();
  return g_requested_threads;
}

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be at least 1, got " + std::to_string(n));
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_requested_threads = n;
}

}  // namespace cgq
