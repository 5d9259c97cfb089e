/* The umbrella header of the CDsv3 module (module.modulemap).
 *
 * Inside this repository it includes include/dsv3.h by a path relative to this file
 * (bindings/swift/Sources/CDsv3 -> include/), so the package always sees the header the library
 * was built from and needs no -I flag. Elsewhere (the package copied out of the repository) it
 * falls back to <dsv3.h>: copy include/dsv3.h next to this file, or pass its directory with
 * `swift build -Xcc -I<dir>`. */
#ifndef CDSV3_SHIM_H
#define CDSV3_SHIM_H

#if defined(__has_include)
#if __has_include("../../../../include/dsv3.h")
#include "../../../../include/dsv3.h"
#define CDSV3_HAVE_HEADER 1
#endif
#endif

#ifndef CDSV3_HAVE_HEADER
#include "dsv3.h"
#endif

#endif /* CDSV3_SHIM_H */
