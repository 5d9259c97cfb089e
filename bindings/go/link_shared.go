//go:build !dsv3_static

package dsv3

// Default linking: the shared library libdsv3.so of the repository's release build
// (`cargo build --release -p dsv3-ffi`), found at run time through an rpath. Flags in the
// CGO_LDFLAGS environment variable come before these, so
//
//	CGO_LDFLAGS="-L/path/to/lib -Wl,-rpath,/path/to/lib"
//
// picks another build (e.g. target/debug) or an installed copy. Build with -tags dsv3_static to
// link the static library instead (see link_static.go).

/*
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -Wl,-rpath,${SRCDIR}/../../target/release -ldsv3
*/
import "C"
