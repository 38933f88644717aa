// zlib (Debian zlib1g-dev): gzip-compressed IDX files are read through gzopen/gzread.
#include <zlib.h>
