// standalone_main.h: main() of a sanitizer build of a module.
//
// Sanitizer runtimes cannot be loaded into Python, so a sanitizer build is an
// executable that serves one launch.  Python writes the launch to a request
// file; every array region becomes a buffer this program allocates with its
// exact size (so AddressSanitizer sees the bounds), the kernel runs, and the
// buffers are written back to the response file.
//
// Request, all fields little-endian uint64, byte strings padded to 8 bytes:
//   "HCREQ001" kernel grid[3] block[3] shared_mem
//   nblobs, then per blob: size, bytes
//   nargs, then per argument: 0 size bytes (a value) | 1 blob offset (a pointer)
#ifndef CUPYBN_HOSTCUDA_STANDALONE_MAIN_H
#define CUPYBN_HOSTCUDA_STANDALONE_MAIN_H

#include <cstdlib>
#include <fstream>
#include <iterator>

namespace hostcuda {

class RequestReader {
 public:
  explicit RequestReader(std::vector<char> data) : data_(std::move(data)) {}
  unsigned long long u64() {
    need(8);
    unsigned long long v;
    std::memcpy(&v, data_.data() + pos_, 8);
    pos_ += 8;
    return v;
  }
  const char* bytes(unsigned long long n) {
    need(n);
    const char* p = data_.data() + pos_;
    pos_ += (n + 7) / 8 * 8;
    return p;
  }

 private:
  void need(unsigned long long n) {
    if (pos_ + n > data_.size()) {
      std::fprintf(stderr, "hostcuda: truncated request\n");
      std::exit(2);
    }
  }
  std::vector<char> data_;
  std::size_t pos_ = 0;
};

}  // namespace hostcuda

int main(int argc, char** argv) {
  using namespace hostcuda;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s REQUEST RESPONSE\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  RequestReader req(std::vector<char>(std::istreambuf_iterator<char>(in), {}));
  if (std::memcmp(req.bytes(8), "HCREQ001", 8) != 0) {
    std::fprintf(stderr, "hostcuda: not a request file\n");
    return 2;
  }
  const unsigned long long kernel = req.u64();
  if (kernel >= hostcuda_kernel_count) return 2;
  LaunchConfig cfg;
  for (auto& g : cfg.grid) g = static_cast<unsigned>(req.u64());
  for (auto& b : cfg.block) b = static_cast<unsigned>(req.u64());
  cfg.shared_mem = req.u64();

  std::vector<std::pair<char*, unsigned long long>> blobs(req.u64());
#if defined(HOSTCUDA_RACECHECK)
  hostcuda_race_init(dynamic_smem, kMaxDynamicShared, static_smem, kStaticSharedArena);
#endif
  for (std::size_t i = 0; i < blobs.size(); ++i) {
    auto& [ptr, size] = blobs[i];
    size = req.u64();
    ptr = static_cast<char*>(std::malloc(size));  // exactly the region: ASan's bounds
    std::memcpy(ptr, req.bytes(size), size);
#if defined(HOSTCUDA_RACECHECK)
    hostcuda_race_add_global(ptr, size, static_cast<int>(i));  // the arrays are global memory
#endif
  }
  const unsigned long long nargs = req.u64();
  std::vector<void*> args(nargs);
  std::vector<void*> pointers(nargs);
  std::vector<void*> values;
  for (unsigned long long i = 0; i < nargs; ++i) {
    if (req.u64() == 0) {
      const unsigned long long size = req.u64();
      void* v = std::aligned_alloc(16, (size + 15) / 16 * 16);
      std::memcpy(v, req.bytes(size), size);
      values.push_back(v);
      args[i] = v;
    } else {
      const unsigned long long blob = req.u64();
      const unsigned long long offset = req.u64();
      pointers[i] = blobs.at(blob).first + offset;
      args[i] = &pointers[i];
    }
  }
  char err[2048] = {0};
  const int failed = hostcuda_kernels[kernel](&cfg, args.data(), err, sizeof err);
#if defined(HOSTCUDA_RACECHECK)
  // Races first: a kernel that failed may have failed because of one.
  const bool raced = hostcuda_race_finish(cfg.grid, cfg.block) != 0;
#else
  const bool raced = false;
#endif
  if (raced) {  // names for the static __shared__ slots the report mentions
    for (const StaticSharedSlot& s : static_shared_arena().slots) {
      std::fprintf(stderr, "hostcuda-static-shared offset=%zu size=%zu name=%s function=%s\n", s.offset, s.size,
                   s.name, s.function);
    }
  }
  if (failed != 0) {
    std::fprintf(stderr, "hostcuda-kernel-error: %s\n", err);
    return 3;
  }
  if (raced) return 66;
  std::ofstream out(argv[2], std::ios::binary);
  for (auto& [ptr, size] : blobs) {
    out.write(ptr, static_cast<std::streamsize>(size));
    std::free(ptr);
  }
  for (void* v : values) std::free(v);
  return out.good() ? 0 : 2;
}

#endif  // CUPYBN_HOSTCUDA_STANDALONE_MAIN_H
