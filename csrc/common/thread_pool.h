// A small fixed pool of worker threads for the CPU kernels.
//
// Why not OpenMP: torch's CPU wheel bundles its own libgomp, and a second OpenMP runtime in the
// same process gives two thread pools fighting over the same cores. This pool is tiny, its
// threads sleep as soon as a job is done (so they never steal the cores from torch's pool between
// our calls), and it is used by one caller at a time (calls from several Python threads are
// serialised, since each call already uses every core).
#pragma once

#include <cstdint>
#include <functional>

namespace cgq {

// Calls fn(begin, end) on disjoint, contiguous chunks that cover [0, n) (chunk boundaries are
// multiples of `grain`), using up to min(num_threads(), max_jobs) threads including the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn, int max_jobs = 1 << 30);

// Threads used by parallel_for. Defaults to CODEGEN_Q_NUM_THREADS, else the CPUs this process may
// run on. set_num_threads(n) with n >= 1 resizes the pool.
int get_num_threads();
void set_num_threads(int n);

}  // namespace cgq
