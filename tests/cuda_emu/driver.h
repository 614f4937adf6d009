// Shared by the emulation drivers (*_main.cpp): raw-file input / output, and one kernel launch run on the CPU
// (include after emu.h and the kernel header).
#pragma once
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

template <typename X> std::vector<X> rd(const std::string& f, size_t n) {
  std::vector<X> v(n);
  std::ifstream in(f, std::ios::binary);
  if (!in) { std::fprintf(stderr, "missing %s\n", f.c_str()); std::exit(1); }
  in.read(reinterpret_cast<char*>(v.data()), n * sizeof(X));
  return v;
}
template <typename X> void wr(const std::string& f, const std::vector<X>& v) {
  std::ofstream o(f, std::ios::binary);
  o.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(X));
}

// One launch over `grid` of `threads`-thread blocks, one block at a time: each CUDA thread an OS thread, shared
// memory (`smem`, `capacity` bytes; the kernel needs `needed`) poisoned with 0xFF before every block, pending
// cp.async groups flushed when a thread returns.
inline void launch_grid(char* smem, size_t capacity, size_t needed, dim3e grid, int threads,
                        const std::function<void()>& kern) {
  if (needed > capacity) { std::fprintf(stderr, "smem too large: %zu\n", needed); std::exit(1); }
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem, 0xff, capacity);
        std::barrier<> bar(threads);
        std::vector<WarpCtx> warps((threads + 31) / 32);
        g_block_bar = &bar;
        g_warps = warps.data();
        std::vector<std::thread> th;
        for (int t = 0; t < threads; ++t)
          th.emplace_back([&, t] {
            threadIdx = {unsigned(t), 0, 0};
            blockIdx = {x, y, z};
            blockDim = {unsigned(threads), 1, 1};
            gridDim = grid;
            kern();
            if (!t_groups.empty() || !t_open.empty()) cp_async_flush_all();
          });
        for (auto& t : th) t.join();
      }
}
