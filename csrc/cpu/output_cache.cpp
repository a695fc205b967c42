// Storage of the cpu kernels' large outputs (empty_output in ops_common.h): the norms' y, z, dx,
// dresidual and attention's out, lse, dq, dk, dv.
//
// A training loop asks for outputs of the same few sizes on every step and frees them a
// moment later. Under glibc's defaults a block of 128 KB or more is mmap-ed, or taken from
// the top of the heap, and handed back to the system when freed, so each new output
// page-faults on first touch, 4 KB at a time: at 1024 x 768 float32 (3 MB) a layer norm's
// forward and backward took 120 to 270 faults per step, which cost as much as the kernels.
// Here a freed output of 128 KB or more is kept, up to a limit on the bytes held (256 MB, or
// FUSEDLAYERS_CPU_CACHE_MB; 0 turns the cache off), and the next output of about its size
// (at most 1/8 larger) reuses it, the pages its former owner touched already mapped. The
// blocks kept longest are returned to the system first when the limit is reached. Blocks of
// 4 MB or more are 2 MB-aligned with transparent huge pages advised (Linux, THP "madvise" or
// "always"), so their first touch faults 2 MB at a time. The cost: a kept block may have left
// the CPU's caches where glibc would have handed out memory another op had just touched. So a
// block under 32 MB (glibc's largest mmap threshold: below it glibc serves and takes back such
// blocks through its heap once one has been freed) is reused only within reuse_us of its free (2 ms,
// in which memory at 16 GB/s moves 32 MB, the L3 cache of the 2-core machine measured); where only older ones
// fit, one goes back to glibc, after the new block is taken, so that glibc does not hand the same one out again.
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cpu/ops_common.h"

namespace fusedlayers::cpu {
namespace {

constexpr size_t kMinBytes = size_t{128} << 10;  // glibc's default mmap threshold
constexpr size_t kPage = 4096;
constexpr size_t kHuge = size_t{2} << 20;
constexpr size_t kMaxBlocks = 64;                 // blocks held at once (a linear scan finds a fit)
constexpr size_t kDefaultLimit = size_t{256} << 20;
constexpr size_t kGlibcMmapMax = size_t{32} << 20;  // glibc's largest dynamic mmap threshold (64-bit)
constexpr int64_t kDefaultReuseUs = 2000;

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void advise_huge(void* p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + n) & ~(kHuge - 1);
  if (n >= 2 * kHuge && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
}

// FUSEDLAYERS_CPU_CACHE_MB, or the default limit (with a warning) when it is not a whole number of MB >= 0.
size_t limit_from_env() {
  const char* s = std::getenv("FUSEDLAYERS_CPU_CACHE_MB");
  if (s == nullptr || *s == '\0') return kDefaultLimit;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(s, &end, 10);
  if (*end != '\0' || errno != 0 || mb < 0 || mb >= (1LL << 40)) {
    TORCH_WARN("fusedlayers: FUSEDLAYERS_CPU_CACHE_MB must be a whole number of megabytes >= 0, got '", s,
               "'; the cpu output cache keeps its default limit of ", kDefaultLimit >> 20, " MB");
    return kDefaultLimit;
  }
  return static_cast<size_t>(mb) << 20;
}

void release(void* p);

struct Kept {
  size_t bytes;
  void* p;
  int64_t freed_us;  // now_us() at its free
};

struct OutputCache final : c10::Allocator {
  std::mutex mu;
  std::vector<Kept> kept;                 // freed blocks, oldest first
  std::unordered_map<void*, size_t> live;  // blocks in use -> bytes
  size_t held = 0;                        // bytes in `kept`
  size_t limit = limit_from_env();
  int64_t reuse_us = kDefaultReuseUs;  // blocks under kGlibcMmapMax are reused within this long of their free
  int64_t hits = 0, misses = 0, expired = 0;

  OutputCache() { kept.reserve(kMaxBlocks); }

  c10::DataPtr allocate(size_t n) override {
    void* p = n == 0 ? nullptr : take(n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // A kept block of n to n + n/8 bytes (the smallest; of equal ones the one freed last, the warmest in cache:
  // taking the oldest handed the block of an output written with streaming stores, whose lines those stores had
  // evicted, to an output written through the cache, and add + layer norm's forward under autograd took 1.4x as
  // long) among the reusable ones (kGlibcMmapMax or more, or freed within reuse_us), else a new one. Where only
  // blocks past their reuse time fit, the best of them is taken out and freed after the new one is allocated
  // (other old blocks go back to the system as the limit or the block count evicts them).
  void* take(size_t n) {
    const size_t bytes = (n + kPage - 1) / kPage * kPage;
    void* stale = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      const int64_t now = now_us();
      size_t best = kept.size(), best_stale = kept.size();
      for (size_t i = 0; i < kept.size(); ++i) {
        const size_t b = kept[i].bytes;
        if (b < bytes || b - bytes > bytes / 8) continue;
        size_t& pick = b >= kGlibcMmapMax || now - kept[i].freed_us <= reuse_us ? best : best_stale;
        if (pick == kept.size() || b <= kept[pick].bytes) pick = i;
      }
      if (best != kept.size()) {
        const Kept k = kept[best];
        live.emplace(k.p, k.bytes);  // (first: a throw leaves everything as it was)
        kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(best));
        held -= k.bytes;
        ++hits;
        return k.p;
      }
      if (best_stale != kept.size()) {
        stale = kept[best_stale].p;
        held -= kept[best_stale].bytes;
        kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(best_stale));
        ++expired;
      }
      ++misses;
    }
    void* p = nullptr;
    try {
      p = fresh(bytes);
    } catch (...) {
      std::free(stale);
      throw;
    }
    std::free(stale);
    return p;
  }

  // A new block of `bytes` (page-rounded), recorded as live.
  void* fresh(size_t bytes) {
    void* p = nullptr;
    const size_t align = bytes >= 2 * kHuge ? kHuge : 64;
    if (posix_memalign(&p, align, bytes) != 0 || p == nullptr) {
      TORCH_CHECK_WITH(OutOfMemoryError, false, "fusedlayers: cannot allocate ", bytes, " bytes for a cpu output");
    }
    advise_huge(p, bytes);
    try {
      std::lock_guard<std::mutex> g(mu);
      live.emplace(p, bytes);
    } catch (...) {
      std::free(p);
      throw;
    }
    return p;
  }

  // Under mu: takes the oldest kept blocks out until `incoming` more bytes fit under the limit and fewer than
  // max_blocks stay kept; their pointers go to out (room for kMaxBlocks), their count is returned.
  size_t drop_oldest(size_t incoming, size_t max_blocks, void** out) noexcept {
    size_t drop = 0;
    while (drop < kept.size() && (held + incoming > limit || kept.size() - drop >= max_blocks)) {
      held -= kept[drop].bytes;
      out[drop] = kept[drop].p;
      ++drop;
    }
    kept.erase(kept.begin(), kept.begin() + static_cast<std::ptrdiff_t>(drop));
    return drop;
  }

  // The deleter of every block (it runs in noexcept destructors, so nothing here allocates or throws: `kept` has
  // room for kMaxBlocks, and at most kMaxBlocks + 1 blocks are freed).
  void give_back(void* p) noexcept {
    std::array<void*, kMaxBlocks + 1> to_free;
    size_t n_free = 0;
    {
      std::lock_guard<std::mutex> g(mu);
      const auto it = live.find(p);
      if (it == live.end()) {
        std::fprintf(stderr, "fusedlayers: a cpu output's memory was freed twice or is not the cache's\n");
        std::abort();
      }
      const size_t bytes = it->second;
      live.erase(it);
      if (bytes < kMinBytes || bytes > limit) {
        to_free[n_free++] = p;
      } else {
        n_free = drop_oldest(bytes, kMaxBlocks, to_free.data());
        kept.push_back({bytes, p, now_us()});
        held += bytes;
      }
    }
    for (size_t i = 0; i < n_free; ++i) std::free(to_free[i]);
  }

  size_t current_limit() {
    std::lock_guard<std::mutex> g(mu);
    return limit;
  }

  std::vector<int64_t> stats(int64_t new_limit, int64_t new_reuse_us) {
    std::array<void*, kMaxBlocks> to_free;
    size_t n_free = 0;
    std::vector<int64_t> out;
    {
      std::lock_guard<std::mutex> g(mu);
      if (new_reuse_us >= 0) reuse_us = new_reuse_us;
      if (new_limit >= 0) {
        limit = static_cast<size_t>(new_limit);
        n_free = drop_oldest(0, kMaxBlocks + 1, to_free.data());
      }
      size_t in_use = 0;
      for (const auto& [p, b] : live) in_use += b;
      out = {static_cast<int64_t>(held), static_cast<int64_t>(limit), hits, misses,
             static_cast<int64_t>(kept.size()), static_cast<int64_t>(in_use), reuse_us, expired};
    }
    for (size_t i = 0; i < n_free; ++i) std::free(to_free[i]);
    return out;
  }
};

// Made when the library loads (a fork() during its first use could otherwise leave the child waiting on an
// initialisation that never ends); never destroyed, since tensors may outlive static destruction at exit.
OutputCache& cache() {
  static OutputCache* c = [] {
    auto* made = new OutputCache();
#if defined(__linux__)
    // fork() while another thread holds the lock would leave it held in the child.
    pthread_atfork([] { cache().mu.lock(); }, [] { cache().mu.unlock(); }, [] { cache().mu.unlock(); });
#endif
    return made;
  }();
  return *c;
}

void release(void* p) {
  if (p != nullptr) cache().give_back(p);
}

[[maybe_unused]] const OutputCache& kMadeAtLoad = cache();

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t n = c10::multiply_integers(sizes) * options.dtype().itemsize();
  if (n >= kMinBytes && cache().current_limit() > 0) {
    return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), options.memory_format_opt());
  }
  at::Tensor t = at::empty(sizes, options);
  advise_huge(t.data_ptr(), t.nbytes());
  return t;
}

std::vector<int64_t> output_cache_stats(int64_t new_limit, int64_t new_reuse_us) {
  return cache().stats(new_limit, new_reuse_us);
}

}  // namespace fusedlayers::cpu
