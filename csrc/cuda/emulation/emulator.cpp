// The launch of cuda_runtime.h here: a grid's blocks one after another, a block's threads as ucontext fibers run in
// turn until each waits at a barrier (__syncthreads: the block's live threads; a shuffle: the warp's) or returns.
// A barrier opens when every live thread it spans waits at it; a block where none can go on is a deadlock and
// aborts, as is a shuffle of a warp with returned lanes (the kernels shuffle with full masks).
#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_runtime.h"

namespace kc_emulation {

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

enum class Wait { kNone, kBlock, kWarp, kDone };

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  ucontext_t scheduler;
  std::vector<ucontext_t> fibers;
  std::vector<std::vector<char>> stacks;
  std::vector<Wait> wait;
  std::vector<float> lanes;  // each thread's shuffled value
  int threads = 0, current = 0;
  const std::function<void()>* body = nullptr;
};

Block block;

[[noreturn]] void fail(const char* what) {
  fprintf(stderr, "kc CUDA emulation: %s (block %u,%u, thread %d)\n", what, blockIdx.x, blockIdx.y, block.current);
  abort();
}

void park(Wait w) {
  block.wait[block.current] = w;
  swapcontext(&block.fibers[block.current], &block.scheduler);
}

void fiber_main() {
  (*block.body)();
  park(Wait::kDone);
}

// Opens the barriers every live thread of which waits; false if none opened.
bool open_barriers() {
  int live = 0, at_block = 0;
  for (int t = 0; t < block.threads; ++t) {
    live += block.wait[t] != Wait::kDone;
    at_block += block.wait[t] == Wait::kBlock;
  }
  bool opened = false;
  if (live > 0 && at_block == live) {
    for (int t = 0; t < block.threads; ++t) {
      if (block.wait[t] == Wait::kBlock) block.wait[t] = Wait::kNone;
    }
    opened = true;
  }
  for (int w = 0; w < block.threads; w += 32) {
    const int end = w + 32 < block.threads ? w + 32 : block.threads;
    int warp_live = 0, at_warp = 0;
    for (int t = w; t < end; ++t) {
      warp_live += block.wait[t] != Wait::kDone;
      at_warp += block.wait[t] == Wait::kWarp;
    }
    if (at_warp == 0 || at_warp != warp_live) continue;
    if (warp_live != end - w) fail("a warp shuffle with lanes that returned");
    for (int t = w; t < end; ++t) block.wait[t] = Wait::kNone;
    opened = true;
  }
  return opened;
}

void run_block() {
  for (int t = 0; t < block.threads; ++t) {
    getcontext(&block.fibers[t]);
    block.fibers[t].uc_stack.ss_sp = block.stacks[t].data();
    block.fibers[t].uc_stack.ss_size = kStackBytes;
    block.fibers[t].uc_link = nullptr;
    makecontext(&block.fibers[t], fiber_main, 0);
    block.wait[t] = Wait::kNone;
  }
  for (;;) {
    bool ran = false;
    for (int t = 0; t < block.threads; ++t) {
      if (block.wait[t] != Wait::kNone) continue;
      ran = true;
      block.current = t;
      threadIdx = dim3(static_cast<unsigned>(t), 0, 0);
      swapcontext(&block.scheduler, &block.fibers[t]);
    }
    bool done = true;
    for (int t = 0; t < block.threads; ++t) done = done && block.wait[t] == Wait::kDone;
    if (done) return;
    if (!open_barriers() && !ran) fail("deadlock: no thread can go on");
  }
}

}  // namespace

void sync_block() { park(Wait::kBlock); }

float shuffle_xor(float v, int lane_mask) {
  const int me = block.current;
  block.lanes[me] = v;
  park(Wait::kWarp);
  const int src = (me & ~31) | ((me & 31) ^ lane_mask);
  if (src >= block.threads) fail("a shuffle from a lane past the block");
  const float got = block.lanes[src];
  park(Wait::kWarp);  // every lane has read before any writes its next value
  return got;
}

void launch(const std::function<void()>& thread_body, dim3 grid, dim3 threads) {
  if (threads.y != 1 || threads.z != 1 || grid.z != 1) fail("only 1-D blocks and 2-D grids are emulated");
  block.threads = static_cast<int>(threads.x);
  block.fibers.resize(block.threads);
  block.stacks.resize(block.threads);
  for (auto& s : block.stacks) s.resize(kStackBytes);
  block.wait.assign(block.threads, Wait::kNone);
  block.lanes.assign(block.threads, 0.f);
  block.body = &thread_body;
  blockDim = threads;
  gridDim = grid;
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = dim3(x, y, 0);
      run_block();
    }
  }
}

}  // namespace kc_emulation
