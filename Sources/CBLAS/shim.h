// OpenBLAS's CBLAS interface (Debian libopenblas-dev). cblas.h from OpenBLAS also declares
// openblas_set_num_threads, which Tandem uses to keep BLAS single-threaded when it splits
// the batch across cores itself (or when MPI ranks fill the cores).
#include <cblas.h>
