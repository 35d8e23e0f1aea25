// A plain parallel memory copy, the yardstick of the benchmarks: the bandwidth a pass over
// memory can reach on this machine, with the library's own threads. Non-temporal stores
// bypass the cache (no read-for-ownership of the destination), which is how a streaming
// copy reaches the memory limit.
#include <cstring>

#include "batchnorm/runtime.hpp"
#include "batchnorm/types.hpp"
#include "threads.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace batchnorm {

namespace {

void copy_range(const char* src, char* dst, std::size_t bytes, bool nontemporal) {
#if defined(__SSE2__)
  if (nontemporal) {
    std::size_t head = (16 - reinterpret_cast<std::uintptr_t>(dst) % 16) % 16;
    if (head > bytes) head = bytes;
    std::memcpy(dst, src, head);
    std::size_t i = head;
    for (; i + 64 <= bytes; i += 64)
      for (std::size_t j = 0; j < 64; j += 16)
        _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + j),
                         _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + j)));
    std::memcpy(dst + i, src + i, bytes - i);
    _mm_sfence();
    return;
  }
#endif
  (void)nontemporal;
  std::memcpy(dst, src, bytes);
}

}  // namespace

void copy_memory(const void* src, void* dst, std::size_t bytes, bool nontemporal) {
  const auto* s = static_cast<const char*>(src);
  auto* d = static_cast<char*>(dst);
  const int nt = detail::threads_for(static_cast<index_t>(bytes / 4));
  detail::parallel(nt, [&](int t, int n) {
    index_t begin, end;
    detail::partition(static_cast<index_t>(bytes), t, n, begin, end);
    copy_range(s + begin, d + begin, static_cast<std::size_t>(end - begin), nontemporal);
  });
}

}  // namespace batchnorm
