/* heald's native scoring kernels: the library's ABI version (kernels.h describes the whole).
 *
 * The loader (agent/native/__init__.py) calls heald_kernels_abi() first and refuses a library
 * whose answer differs from its own ABI constant: a stale build leaves scoring to numpy.
 */
#include "kernels.h"

int heald_kernels_abi(void) { return HEALD_KERNELS_ABI; }
