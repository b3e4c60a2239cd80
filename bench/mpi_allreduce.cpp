// moonwalk-mpi-allreduce — the all-reduce's latency and bandwidth on this
// machine's MPI transport, the inputs of the data-parallel scaling model
// (bench/mpi_scaling.sh, BENCHMARKS.md "Data parallelism"). Run under mpirun:
//
//   mpirun -n 2 moonwalk-mpi-allreduce [--repeats R]
//
// Prints one line per message size (bytes, best seconds of R blocking
// MPI_Allreduce sums of floats), then the fit t(m) = α + m/β by least squares
// over the sizes ≥ 64 KiB for β and the 4-byte time for α:
//   allreduce ranks=N alpha_seconds=… bandwidth_bytes_per_second=…
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <moonwalk/distributed/mpi.hpp>
#include <vector>

int main(int argc, char** argv) {
  moonwalk::mpi::Session session(argc, argv);
  int repeats = 20;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--repeats") == 0) repeats = std::max(1, std::atoi(argv[i + 1]));
  const int rank = moonwalk::mpi::rank(MPI_COMM_WORLD), ranks = moonwalk::mpi::size(MPI_COMM_WORLD);
  std::vector<float> buffer(std::size_t{4} << 20, 1.0f);  // up to 16 MiB
  double alpha = 0, sx = 0, sy = 0, sxx = 0, sxy = 0;
  int fitted = 0;
  for (std::size_t bytes = 4; bytes <= buffer.size() * sizeof(float); bytes *= 4) {
    const int n = static_cast<int>(bytes / sizeof(float));
    double best = 1e300;
    for (int r = 0; r < repeats; ++r) {
      MPI_Barrier(MPI_COMM_WORLD);
      const auto t0 = std::chrono::steady_clock::now();
      moonwalk::mpi::check(MPI_Allreduce(MPI_IN_PLACE, buffer.data(), n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD),
                           "MPI_Allreduce");
      double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);  // the slowest rank's
      best = std::min(best, t);
    }
    if (bytes == 4) alpha = best;
    if (bytes >= (std::size_t{64} << 10)) {
      const double x = static_cast<double>(bytes);
      sx += x, sy += best, sxx += x * x, sxy += x * best, ++fitted;
    }
    if (rank == 0) std::printf("bytes=%zu seconds=%.9g\n", bytes, best);
  }
  const double slope = (fitted * sxy - sx * sy) / (fitted * sxx - sx * sx);  // seconds per byte
  if (rank == 0)
    std::printf("allreduce ranks=%d alpha_seconds=%.9g bandwidth_bytes_per_second=%.6g\n", ranks, alpha,
                1.0 / slope);
  return 0;
}
