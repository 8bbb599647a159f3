// Runs csrc/solve_cuda.cu on the host through shim.h (see there). Used by tests/test_native.py.
//   emulate DTYPE(0 f32|1 f64) B C H W K ORIENTATION UNIT ADJOINT MAX_ROWS FORCE_RING Y_FILE W_FILE X_FILE
// The files hold float64 values (y: B*C*H*W, weight: C*C*K*K); prints the plan on stdout.
#include "shim.h"

#include "../../csrc/solve_cuda.cu"

#include <cstdio>
#include <fstream>

static std::vector<double> read_doubles(const char* path, size_t n) {
  std::vector<double> v(n);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(double)));
  if (!f) {
    std::fprintf(stderr, "cannot read %zu doubles from %s\n", n, path);
    std::exit(2);
  }
  return v;
}

template <class T>
static int run(int argc, char** argv, const int* a) {
  const int B = a[1], C = a[2], H = a[3], W = a[4], k = a[5];
  InvconvCudaPlan plan;
  if (const char* err = invconv_cuda_plan(a[0], B, C, H, W, k, a[9], a[10], &plan)) {
    std::fprintf(stderr, "%s\n", err);
    return 3;
  }
  std::printf("rows=%d strips=%d ring=%d ring_cols=%d pitch=%d ob=%d n_ob=%d slices=%d weights_in_smem=%d smem=%zu\n",
              plan.rows, plan.strips, plan.ring, plan.ring_cols, plan.pitch, plan.ob, plan.n_ob, plan.slices,
              plan.weights_in_smem, plan.smem_bytes);
  const size_t ny = static_cast<size_t>(B) * C * H * W, nw = static_cast<size_t>(C) * C * k * k;
  std::vector<double> yd = read_doubles(argv[12], ny), wd = read_doubles(argv[13], nw);
  std::vector<T> y(yd.begin(), yd.end()), w(wd.begin(), wd.end()), x(ny, T(NAN));
  std::vector<unsigned char> ws(plan.workspace_bytes + 64, 0xFF);
  void* wsp = ws.data() + (64 - reinterpret_cast<uintptr_t>(ws.data()) % 64) % 64;
  // EMU_REPEAT=n solves n times (the kernel attributes must be set once, not per call).
  const int repeat = std::getenv("EMU_REPEAT") ? std::atoi(std::getenv("EMU_REPEAT")) : 1;
  for (int i = 0; i < repeat; ++i)
    if (const char* err = invconv_cuda_solve(&plan, y.data(), w.data(), x.data(), a[6], a[7], a[8], wsp, nullptr)) {
      // An error must leave no error state behind (CUDA's own text is in the message).
      std::fprintf(stderr, "%s\nerror state afterwards: %s\n", err, cudaGetErrorName(cudaGetLastError()));
      return 4;
    }
  std::printf("attribute_calls=%d\n", emu::attribute_calls());
  std::vector<double> xd(x.begin(), x.end());
  std::ofstream f(argv[14], std::ios::binary);
  f.write(reinterpret_cast<const char*>(xd.data()), static_cast<std::streamsize>(ny * sizeof(double)));
  return f ? 0 : 5;
}

int main(int argc, char** argv) {
  if (argc != 15) {
    std::fprintf(stderr, "usage: %s DTYPE B C H W K ORIENTATION UNIT ADJOINT MAX_ROWS FORCE_RING Y W X\n", argv[0]);
    return 1;
  }
  int a[11];
  for (int i = 0; i < 11; ++i) a[i] = std::atoi(argv[i + 1]);
  return a[0] == 0 ? run<float>(argc, argv, a) : run<double>(argc, argv, a);
}
